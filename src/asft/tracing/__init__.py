"""Per-token gradient tracing: the analysis behind the token-weighted modes (sft-topk, sft-antiop, sft-lr).

`spec` (torch-free) plans traces from the config; `gradients` takes exact per-token gradients and projects them;
`stage` is the `asft trace` job; `analysis` turns a trace into metrics, plots and the page `viewer` renders;
`compare` sets traces side by side with the published findings. Submodules are imported where used, so planning
the workflow never loads torch.
"""
