"""The trace viewer: one static HTML page to read a per-token gradient trace token by token.

The page is self-contained (inline CSS and vanilla JS, no network, works opened as file://) so it can be copied off
a cluster and opened anywhere. It shows the trace's title, subtitle and headline metrics; a text panel with every
traced sequence in order, prompt tokens greyed and target tokens coloured by alignment a_t = cos(g_t, Σ_s g_s) on a
diverging scale (blue aligned, red opposing, white near 0, intensity ∝ |a_t|, grey for a zero gradient), each with a
tooltip of its class, alignment, magnitude, CE and per-mode weights; and a sortable table of the target tokens,
paged (250 rows by default): a 7B trace has ~30k targets, and a table that size takes Chromium tens of seconds per
relayout, so sorting and filtering work on an array and only one page of rows is ever in the DOM.
Checkboxes hide token classes from the table and dim them in the text; a selector narrows both to one sequence;
the colour range can be stretched to the largest |a_t| when alignments are small. Clicking a token selects its row
and clicking a row selects its token.

Safety: the view model is embedded as JSON in `<script type="application/json" id="trace-data">` with `<`, `>`
and `&` escaped as \\u003c/\\u003e/\\u0026 and non-ASCII (U+2028 included) as \\uXXXX, so no token text can end the
element or open a comment; the page puts text in the DOM with textContent only; and its Content-Security-Policy
allows no network and no script but the viewer's own (by hash), so even an injected element could do nothing.

DOM hooks (the tests rely on them): `#token-table` whose tbody rows carry `data-index`, `data-class`, `data-seq`;
header cells `th[data-key]` (index, sequence, text, class, alignment, magnitude, ce, and `weight_<name>` per
weight), `aria-sort` on the sorted one; `input.class-filter[value=<class>]`; `select#sequence-filter`;
`select#colour-range`; `#page-prev`, `#page-next`, `select#page-size`; `#row-count`; text tokens `#text-panel
span.tok` (`.target` with `data-index`, `data-class`, `data-alignment` — empty for a zero gradient — or `.prompt`);
`body[data-ready="1"]` once the page is built.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from asft.run_io import write_text_atomic

DEFAULT_CLASSES = ("number", "operator", "word", "format", "other")


def _plain(value: Any) -> Any:
    """JSON-ready copy: numpy scalars/arrays to Python, NaN/±inf to None (JSON has no NaN; the page shows "–")."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "tolist"):  # numpy scalar or array
        return _plain(value.tolist())
    raise TypeError(f"viewer: cannot embed {type(value).__name__} in the page's JSON")


def embed_json(data: Any) -> str:
    """JSON that is inert inside a <script> element: no `<` (so no `</script>` or `<!--`), `>` or `&` survives,
    and everything non-ASCII (U+2028/2029 included) is a \\u escape. Still valid JSON for JSON.parse."""
    text = json.dumps(_plain(data), ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _check(view: Mapping[str, Any]) -> None:
    """Fail here, in Python, rather than leave a page that breaks in the reader's browser."""
    if not isinstance(view, Mapping) or not isinstance(view.get("sequences"), (list, tuple)):
        raise ValueError("viewer: the view model needs a 'sequences' list")
    seen: set[int] = set()
    for seq in view["sequences"]:
        if "id" not in seq or not isinstance(seq.get("tokens"), (list, tuple)):
            raise ValueError("viewer: every sequence needs an 'id' and a 'tokens' list")
        for token in seq["tokens"]:
            if "text" not in token:
                raise ValueError(f"viewer: a token of sequence {seq['id']} has no 'text'")
            if token.get("target"):
                index = token.get("index")
                if isinstance(index, bool) or not isinstance(index, int) and not hasattr(index, "__index__"):
                    raise ValueError(f"viewer: target token {token['text']!r} of {seq['id']} has no integer index")
                if int(index) in seen:
                    raise ValueError(f"viewer: target index {int(index)} appears twice")
                seen.add(int(index))


def _sha256(source: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii")


def render_viewer(view: Mapping[str, Any]) -> str:
    """The viewer page for `view` (the dict `asft.tracing.analysis.view_model` builds), as one HTML string."""
    _check(view)
    data = dict(view)
    data.setdefault("title", "Gradient trace")
    data.setdefault("subtitle", "")
    data.setdefault("metrics", [])
    data.setdefault("classes", list(DEFAULT_CLASSES))
    data.setdefault("weight_names", [])
    csp = (
        f"default-src 'none'; script-src '{_sha256(_JS)}'; style-src '{_sha256(_CSS)}'; "
        "img-src 'none'; connect-src 'none'; base-uri 'none'; form-action 'none'"
    )
    title = html.escape(str(data["title"]))
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{html.escape(csp)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{title}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{_BODY}\n"
        f'<script type="application/json" id="trace-data">{embed_json(data)}</script>\n'
        f"<script>{_JS}</script>\n</body>\n</html>\n"
    )


def write_viewer(view: Mapping[str, Any], path: Path | str) -> Path:
    """Render `view` and write it to `path` atomically (temp sibling + os.replace): a reader never sees half."""
    path = Path(path)
    write_text_atomic(path, render_viewer(view))
    return path


_BODY = """<header>
<h1 id="title"></h1>
<p class="subtitle" id="subtitle"></p>
<table class="metrics" id="metrics"><tbody></tbody></table>
<noscript><p>This page needs JavaScript to show the trace.</p></noscript>
<p class="error" id="error" hidden></p>
</header>
<div class="controls">
<div class="group" id="class-filters"><span class="label">classes</span></div>
<label class="group"><span class="label">sequence</span>
<select id="sequence-filter"><option value="">all sequences</option></select></label>
<label class="group"><span class="label">colour range</span><select id="colour-range"></select></label>
<div class="group legend" id="legend">
<span class="end" id="legend-neg"></span><span class="bar" title="alignment cos(g_t, Σ g)"></span>
<span class="end" id="legend-pos"></span>
<span class="swatch null"></span><span>zero gradient</span>
<span class="tok prompt sample">prompt</span><span>context only</span>
<span class="tok prompt untraced sample">target</span><span>not traced</span>
</div>
</div>
<main>
<h2>Tokens <span class="hint">coloured by alignment; hover for statistics, click to find the row</span></h2>
<div id="text-panel"></div>
<h2>Target tokens <span class="hint" id="row-count"></span></h2>
<div class="pager"><button type="button" id="page-prev">◀ previous</button>
<button type="button" id="page-next">next ▶</button>
<label><span class="label">rows per page</span> <select id="page-size"><option value="100">100</option>
<option value="250" selected>250</option><option value="1000">1000</option>
<option value="0">all</option></select></label></div>
<div class="table-wrap"><table id="token-table"><thead><tr></tr></thead><tbody></tbody></table></div>
</main>"""

_CSS = """
:root { --fg: #1f2328; --muted: #656d76; --border: #d0d7de; --panel: #f6f8fa; --mono: ui-monospace, SFMono-Regular,
  Menlo, Consolas, "DejaVu Sans Mono", monospace; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff; font: 14px/1.45 system-ui, -apple-system, "Segoe UI",
  "DejaVu Sans", sans-serif; }
header { padding: 16px 24px 8px; }
h1 { font-size: 20px; margin: 0 0 2px; }
h2 { font-size: 15px; margin: 16px 0 6px; }
.subtitle { color: var(--muted); margin: 0 0 10px; }
.hint { color: var(--muted); font-weight: normal; font-size: 12px; margin-left: 8px; }
.error { color: #cf222e; font-weight: 600; }
table.metrics { border-collapse: collapse; font-size: 13px; }
table.metrics th { text-align: left; font-weight: normal; color: var(--muted); padding: 1px 18px 1px 0; }
table.metrics td { font-weight: 600; font-variant-numeric: tabular-nums; }
.controls { position: sticky; top: 0; z-index: 3; display: flex; flex-wrap: wrap; align-items: center;
  gap: 8px 28px; padding: 8px 24px; background: var(--panel); border-top: 1px solid var(--border);
  border-bottom: 1px solid var(--border); font-size: 13px; }
.group { display: inline-flex; align-items: center; gap: 6px; }
.label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.class-label { display: inline-flex; align-items: center; gap: 3px; cursor: pointer; }
.class-label .count { color: var(--muted); }
.legend .bar { display: inline-block; width: 170px; height: 12px; border: 1px solid var(--border);
  background: linear-gradient(to right, rgb(178, 24, 43), rgb(255, 255, 255), rgb(33, 102, 172)); }
.legend .end { font-variant-numeric: tabular-nums; color: var(--muted); }
.swatch { display: inline-block; width: 14px; height: 12px; border: 1px solid var(--border); margin-left: 10px; }
.swatch.null { background: #c8ced6; }
.sample { margin-left: 10px; font-family: var(--mono); }
main { padding: 0 24px 28px; }
#text-panel { max-height: 58vh; overflow: auto; border: 1px solid var(--border); border-radius: 6px;
  padding: 4px 12px 10px; }
.seq { border-bottom: 1px dashed var(--border); padding-bottom: 6px; }
.seq:last-child { border-bottom: none; }
.seq h3 { font-size: 12px; font-weight: 600; color: var(--muted); margin: 8px 0 2px; }
.seq-text { font-family: var(--mono); font-size: 13px; line-height: 1.75; white-space: pre-wrap;
  overflow-wrap: anywhere; }
.tok { border-radius: 2px; padding: 1px 0; }
.tok.target { cursor: pointer; box-shadow: inset 0 0 0 1px rgba(0, 0, 0, .06); }
.tok.prompt { color: #8c959f; }
.tok.untraced { color: #57606a; text-decoration: underline dotted #8c959f; }
.tok.null { background: #c8ced6; color: #424a53; }
.tok.ws { color: #8c959f; }
.tok.dim { opacity: .15; }
.tok.selected, #token-table tr.selected td { outline: 2px solid #d4a72c; outline-offset: -1px; }
.table-wrap { max-height: 70vh; overflow: auto; border: 1px solid var(--border); border-radius: 6px; }
#token-table { border-collapse: separate; border-spacing: 0; width: 100%; font-size: 12.5px;
  font-variant-numeric: tabular-nums; }
#token-table th { position: sticky; top: 0; z-index: 1; background: var(--panel); text-align: right;
  padding: 5px 10px; border-bottom: 1px solid var(--border); cursor: pointer; user-select: none;
  white-space: nowrap; font-weight: 600; }
#token-table th:hover { background: #eaeef2; }
#token-table th[aria-sort="ascending"]::after { content: " \\25B2"; }
#token-table th[aria-sort="descending"]::after { content: " \\25BC"; }
#token-table td { padding: 2px 10px; text-align: right; border-bottom: 1px solid #eef1f4; white-space: nowrap; }
#token-table th.left, #token-table td.left { text-align: left; }
#token-table td.text { font-family: var(--mono); white-space: pre; max-width: 28em; overflow: hidden;
  text-overflow: ellipsis; }
#token-table td.null { background: #c8ced6; }
#token-table tbody tr { cursor: pointer; }
.pager { display: flex; align-items: center; gap: 10px; margin: 0 0 6px; font-size: 13px; }
.seq { content-visibility: auto; contain-intrinsic-size: auto 400px; }
#token-table tbody tr:hover td { filter: brightness(.96); }
"""

_JS = r"""
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function num(v) { return typeof v === "number" && isFinite(v) ? v : null; }
  function fmt(v) {
    v = num(v);
    if (v === null) return "\u2013";
    const a = Math.abs(v);
    return a !== 0 && (a >= 1e4 || a < 1e-3) ? v.toExponential(2) : v.toFixed(3);
  }
  const WS = { " ": "\u2423", "\t": "\u21E5", "\r": "\u240D" };
  // whitespace-only tokens become visible marks (␣ ↵ ⇥); a newline still breaks the line in the text panel
  function shown(text, breakLines) {
    if (text === "") return "\u2205";
    const nl = breakLines ? "\u21B5\n" : "\u21B5";
    if (text.trim() === "") return Array.from(text, (ch) => (ch === "\n" ? nl : WS[ch] || "\u00B7")).join("");
    return breakLines ? text.replace(/\n/g, nl) : text.replace(/\n/g, nl).replace(/\t/g, WS["\t"]);
  }

  const BLUE = [33, 102, 172], RED = [178, 24, 43];
  let range = 1;
  function paint(node, a) {
    a = num(a);
    node.classList.toggle("null", a === null);
    if (a === null) { node.style.backgroundColor = ""; node.style.color = ""; return; }
    const t = Math.min(1, Math.abs(a) / range), end = a >= 0 ? BLUE : RED;
    const c = end.map((e) => Math.round(255 + (e - 255) * t));
    node.style.backgroundColor = "rgb(" + c.join(", ") + ")";
    node.style.color = t > 0.55 ? "#fff" : "";
  }

  function main() {
    const data = JSON.parse($("trace-data").textContent);
    const sequences = data.sequences || [], weightNames = data.weight_names || [];
    document.title = String(data.title || "Gradient trace");
    $("title").textContent = String(data.title || "");
    $("subtitle").textContent = String(data.subtitle || "");
    const metricsBody = $("metrics").tBodies[0];
    for (const pair of data.metrics || []) {
      const tr = el("tr");
      tr.append(el("th", null, pair[0]), el("td", null, pair[1]));
      metricsBody.appendChild(tr);
    }

    function tooltip(tok, seq) {
      const w = weightNames.map((n) => n + " " + fmt((tok.weights || {})[n])).join(" \u00B7 ");
      return JSON.stringify(tok.text) + "  #" + tok.index + " \u00B7 " + tok["class"] + " \u00B7 " + seq.id +
        "\nalignment " + fmt(tok.alignment) + (num(tok.alignment) === null ? " (zero gradient)" : "") +
        "\nmagnitude " + fmt(tok.magnitude) + "\nCE " + fmt(tok.ce) + (w ? "\nweights: " + w : "");
    }

    // text panel: built once; a target's span is found again by its index
    const panel = $("text-panel"), seqSelect = $("sequence-filter");
    const rows = [], spanByIndex = new Map(), spansByClass = new Map(), blocks = [];
    let maxAbs = 0;
    sequences.forEach((seq, order) => {
      const block = el("section", "seq"), body = el("div", "seq-text"), frag = document.createDocumentFragment();
      block.dataset.seq = seq.id;
      let nTargets = 0;
      for (const tok of seq.tokens) {
        const text = String(tok.text), span = el("span", "tok", shown(text, true));
        if (text !== "" && text.trim() === "") span.classList.add("ws");
        if (tok.target) {
          const cls = String(tok["class"]), a = num(tok.alignment);
          span.classList.add("target");
          span.dataset.index = tok.index;
          span.dataset.class = cls;
          span.dataset.alignment = a === null ? "" : String(a);
          span.title = tooltip(tok, seq);
          paint(span, a);
          spanByIndex.set(tok.index, span);
          if (!spansByClass.has(cls)) spansByClass.set(cls, []);
          spansByClass.get(cls).push(span);
          if (a !== null) maxAbs = Math.max(maxAbs, Math.abs(a));
          rows.push({ tok, seq, order, pos: rows.length, cls, tr: null, vals: null });
          nTargets++;
        } else if (tok.untraced) {
          span.classList.add("prompt", "untraced");
          span.title = "target token outside the traced sample (trace.tokens_per_batch): no gradient taken";
        } else {
          span.classList.add("prompt");
          span.title = "prompt: context only, no gradient";
        }
        frag.appendChild(span);
      }
      body.appendChild(frag);
      const extra = seq.example_id !== undefined && seq.example_id !== null ? " \u00B7 example " + seq.example_id : "";
      block.append(el("h3", null, seq.id + extra + " \u00B7 " + nTargets + " target tokens"), body);
      panel.appendChild(block);
      blocks.push(block);
      const option = el("option", null, seq.id + extra);
      option.value = seq.id;
      seqSelect.appendChild(option);
    });
    if (!sequences.length) panel.appendChild(el("p", "hint", "No traced sequences."));

    // table: one row per target token. Sorting and filtering work on the array; only one page of rows is in the
    // DOM (each <tr> built once, on first show), since a 30k-row table takes Chromium seconds per relayout.
    const columns = [
      { key: "index", label: "#", num: true, get: (r) => r.tok.index, show: (r) => String(r.tok.index) },
      { key: "sequence", label: "sequence", num: true, left: true, get: (r) => r.order, show: (r) => r.seq.id },
      { key: "text", label: "token", num: false, left: true, get: (r) => String(r.tok.text),
        show: (r) => shown(String(r.tok.text), false) },
      { key: "class", label: "class", num: false, left: true, get: (r) => r.cls },
      { key: "alignment", label: "alignment", num: true, get: (r) => r.tok.alignment },
      { key: "magnitude", label: "magnitude", num: true, get: (r) => r.tok.magnitude },
      { key: "ce", label: "CE", num: true, get: (r) => r.tok.ce },
    ].concat(weightNames.map((n) => ({ key: "weight_" + n, label: "w " + n, num: true,
      get: (r) => (r.tok.weights || {})[n] })));
    const table = $("token-table"), headRow = table.tHead.rows[0], tbody = table.tBodies[0];
    for (const col of columns) {
      const th = el("th", col.left ? "left" : null, col.label);
      th.dataset.key = col.key;
      th.tabIndex = 0;
      th.title = "sort by " + col.label + " (click again to reverse)";
      headRow.appendChild(th);
      col.th = th;
    }
    for (const r of rows) {
      r.vals = {};
      for (const col of columns) {
        const raw = col.get(r);
        r.vals[col.key] = col.num ? num(raw) : raw === undefined || raw === null ? null : String(raw);
      }
    }
    function rowOf(r) {
      if (r.tr) return r.tr;
      const tr = el("tr");
      tr.dataset.index = r.tok.index;
      tr.dataset.class = r.cls;
      tr.dataset.seq = r.seq.id;
      for (const col of columns) {
        const v = r.vals[col.key];
        const td = el("td", col.left ? "left" : null, col.show ? col.show(r) : col.num ? fmt(v) : v);
        if (col.key === "text") td.classList.add("text");
        if (col.key === "alignment") paint(td, v);
        tr.appendChild(td);
      }
      r.tr = tr;
      return tr;
    }

    let shownRows = rows.slice(), pageStart = 0, pageSize = 250;
    const pageSelect = $("page-size");
    function render() {
      const size = pageSize > 0 ? pageSize : Math.max(1, shownRows.length);
      pageStart = Math.max(0, Math.min(pageStart, Math.floor(Math.max(0, shownRows.length - 1) / size) * size));
      const slice = shownRows.slice(pageStart, pageStart + size);
      tbody.replaceChildren(...slice.map(rowOf));
      const last = pageStart + slice.length;
      $("row-count").textContent = (slice.length ? pageStart + 1 + "\u2013" + last : "0") + " of " +
        shownRows.length + " shown (" + rows.length + " target tokens); click a header to sort";
      $("page-prev").disabled = pageStart === 0;
      $("page-next").disabled = last >= shownRows.length;
    }
    $("page-prev").addEventListener("click", () => { pageStart -= pageSize > 0 ? pageSize : 0; render(); });
    $("page-next").addEventListener("click", () => { pageStart += pageSize > 0 ? pageSize : 0; render(); });
    pageSelect.addEventListener("change", () => { pageSize = Number(pageSelect.value); pageStart = 0; render(); });

    const collator = new Intl.Collator(undefined, { numeric: true });
    let sortKey = null, sortDir = 1;
    function sortBy(key) {
      sortDir = key === sortKey ? -sortDir : 1;
      sortKey = key;
      const col = columns.find((c) => c.key === key);
      rows.sort((a, b) => {
        const x = a.vals[key], y = b.vals[key];
        if (x === null || y === null) return x === y ? a.pos - b.pos : x === null ? 1 : -1; // nulls last, always
        const c = col.num ? x - y : collator.compare(x, y);
        return c !== 0 ? sortDir * c : a.pos - b.pos;
      });
      for (const c of columns) {
        if (c.key === key) c.th.setAttribute("aria-sort", sortDir > 0 ? "ascending" : "descending");
        else c.th.removeAttribute("aria-sort");
      }
      pageStart = 0;
      applyFilters();
    }
    headRow.addEventListener("click", (e) => { const th = e.target.closest("th"); if (th) sortBy(th.dataset.key); });
    headRow.addEventListener("keydown", (e) => {
      const th = e.target.closest("th");
      if (th && (e.key === "Enter" || e.key === " ")) { e.preventDefault(); sortBy(th.dataset.key); }
    });

    // filters: a class unchecked leaves the table and fades in the text; a sequence narrows both
    const classes = (data.classes || []).map(String);
    for (const cls of spansByClass.keys()) if (!classes.includes(cls)) classes.push(cls);
    const classOn = new Map(classes.map((c) => [c, true]));
    const filterBox = $("class-filters");
    for (const cls of classes) {
      const label = el("label", "class-label"), box = el("input", "class-filter");
      box.type = "checkbox";
      box.value = cls;
      box.checked = true;
      box.addEventListener("change", () => { classOn.set(cls, box.checked); pageStart = 0; applyFilters(); });
      label.append(box, el("span", null, cls), el("span", "count", "(" + (spansByClass.get(cls) || []).length + ")"));
      filterBox.appendChild(label);
    }
    const dimmed = new Set();
    function applyFilters() {
      const only = seqSelect.value;
      shownRows = rows.filter((r) => classOn.get(r.cls) !== false && (only === "" || r.seq.id === only));
      for (const [cls, spans] of spansByClass) {
        const dim = classOn.get(cls) === false;
        if (dim === dimmed.has(cls)) continue;
        if (dim) dimmed.add(cls); else dimmed.delete(cls);
        for (const s of spans) s.classList.toggle("dim", dim);
      }
      for (const b of blocks) b.hidden = only !== "" && b.dataset.seq !== only;
      render();
    }
    seqSelect.addEventListener("change", () => { pageStart = 0; applyFilters(); });

    // colour range: ±1 is the true scale; ±max|a| stretches it when every alignment is small
    const rangeSelect = $("colour-range");
    const absolute = el("option", null, "\u00B11 (absolute)");
    absolute.value = "1";
    const stretched = el("option", null, "\u00B1" + fmt(maxAbs) + " (largest |alignment|)");
    stretched.value = "auto";
    rangeSelect.append(absolute, stretched);
    stretched.disabled = !(maxAbs > 0);
    function applyRange() {
      range = rangeSelect.value === "auto" && maxAbs > 0 ? maxAbs : 1;
      const label = range === 1 ? "1" : fmt(range);
      $("legend-neg").textContent = "\u2212" + label + " opposing";
      $("legend-pos").textContent = "+" + label + " aligned";
    }
    rangeSelect.addEventListener("change", () => {
      applyRange();
      for (const span of spanByIndex.values()) {
        paint(span, span.dataset.alignment === "" ? null : Number(span.dataset.alignment));
      }
      for (const r of rows) if (r.tr) paint(r.tr.cells[4], r.vals.alignment);
    });
    applyRange();

    // selection links a token to its row (turning to the row's page) and back
    let selectedNodes = [];
    function select(index, toRow) {
      for (const node of selectedNodes) node.classList.remove("selected");
      const wanted = String(index);
      const span = spanByIndex.get(Number(index));
      const at = shownRows.findIndex((r) => String(r.tok.index) === wanted);
      if (toRow && at >= 0 && pageSize > 0 && (at < pageStart || at >= pageStart + pageSize)) {
        pageStart = Math.floor(at / pageSize) * pageSize;
        render();
      }
      const row = at >= 0 ? shownRows[at] : null;
      selectedNodes = [row && rowOf(row), span].filter(Boolean);
      for (const node of selectedNodes) node.classList.add("selected");
      const target = toRow ? row && row.tr : span;
      if (target && target.isConnected) target.scrollIntoView({ block: "nearest" });
    }
    panel.addEventListener("click", (e) => {
      const span = e.target.closest("span.tok.target");
      if (span) select(span.dataset.index, true);
    });
    tbody.addEventListener("click", (e) => {
      const tr = e.target.closest("tr");
      if (tr) select(tr.dataset.index, false);
    });

    applyFilters();
    document.body.dataset.ready = "1";
  }

  try {
    main();
  } catch (err) {
    const box = $("error");
    box.hidden = false;
    box.textContent = "The viewer failed: " + err;
    throw err;
  }
})();
"""
