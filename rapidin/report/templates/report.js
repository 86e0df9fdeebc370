// The report's explorer: the query and sample index tables (search, filters, sorting, shown 100 rows at a
// time) and the one query (#q<index>) or training sample (#s<index>) shown below them. Everything is drawn
// from the JSON in <script id="data"> with textContent, never innerHTML, so user data stays text.
(() => {
  "use strict";
  const data = JSON.parse(document.getElementById("data").textContent);
  const queries = data.queries, samples = data.samples, topN = data.top_n;
  const byIndex = new Map(queries.map((q) => [q.index, q]));
  const STEP = 100; // index rows added per "show more"
  const BLUE = "47, 95, 208", RED = "214, 69, 61";

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "style") Object.assign(node.style, value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined && child !== false) node.append(child);
    }
    return node;
  }
  const fmt = (v) => (v === null ? "—" : Number(v.toPrecision(4)).toString());
  const tag = (kind, text, title) => el("span", { class: `tag ${kind}`, title }, text);

  // Colour: one symmetric diverging scale per view; blue helpful (positive), red harmful (negative).
  function shade(value, scale) {
    if (value === null) return {};
    const alpha = scale > 0 ? (0.9 * Math.min(1, Math.abs(value) / scale)).toFixed(3) : 0;
    return { background: `rgba(${value >= 0 ? BLUE : RED}, ${alpha})`, color: alpha > 0.5 ? "#fff" : "" };
  }
  function legend(scale, what) {
    const ticks = [-1, -0.5, 0, 0.5, 1].map((f) => el("span", { class: "tick" }, fmt(f * scale)));
    return el("div", { class: "legend-bar", "data-scale": scale },
      el("span", { class: "muted" }, what),
      el("div", { class: "bar-box" }, el("div", { class: "bar" }), el("div", { class: "ticks" }, ticks)),
      el("span", { class: "muted" }, "red: harmful (negative), blue: helpful (positive)"));
  }
  function tokens(list, scale, title) {
    return el("span", { class: "tokens" }, list.map((t) => {
      const cut = t[1] === null;
      return el("span", { class: cut ? "t cut" : "t", style: shade(t[1], scale),
        title: cut ? "cut off by data.max_length" : title(t) }, t[0]);
    }));
  }

  // Search and filters.
  const haystacks = new Map();
  function haystack(item) {
    if (!haystacks.has(item)) {
      const parts = [item.id, item.instruction, item.input, item.output, JSON.stringify(item.meta), item.targets || ""];
      haystacks.set(item, parts.join("\n").toLowerCase());
    }
    return haystacks.get(item);
  }
  const controls = {
    search: document.getElementById("search"),
    kind: document.getElementById("kind"),
    poisoned: document.getElementById("poisoned"),
  };
  function matches(item, isQuery) {
    const needle = controls.search.value.trim().toLowerCase();
    if (needle && !haystack(item).includes(needle)) return false;
    const poisonedOnly = controls.poisoned && controls.poisoned.checked;
    if (!isQuery) return !poisonedOnly || Boolean(item.meta.poisoned);
    if (poisonedOnly && !item.poisoned_top) return false;
    const kind = controls.kind.value;
    return kind === "all" || (kind === "attacked" && Boolean(item.meta.attacked))
      || (kind === "clean" && !item.meta.attacked) || (kind === "generated" && Boolean(item.meta.generated));
  }

  // The training samples listed, one row per group of identical samples, with the queries listing them.
  const groups = new Map();
  for (const s of Object.values(samples)) {
    if (!groups.has(s.group) || s.index === s.group) groups.set(s.group, { ...s, helpful: 0, harmful: 0 });
  }
  for (const q of queries) {
    for (const side of ["helpful", "harmful"]) {
      for (const entry of q[side]) groups.get(samples[entry[0]].group)[side] += 1;
    }
  }

  function compare(x, y) { // strings with numbers in numeric order; a missing number (null) first
    if (typeof x === "string") return x.localeCompare(y, undefined, { numeric: true });
    return (x ?? -Infinity) - (y ?? -Infinity) || 0;
  }

  // A sortable, filtered table shown STEP rows at a time.
  function indexTable(id, items, isQuery, row) {
    const table = document.getElementById(id), body = table.querySelector("tbody");
    const more = document.getElementById(`${id}-more`);
    let key = "index", descending = false, order = items, shown = STEP;
    for (const th of table.querySelectorAll("th[data-key]")) {
      th.addEventListener("click", () => {
        descending = th.dataset.key === key ? !descending : th.dataset.key !== "index" && th.dataset.key !== "id";
        key = th.dataset.key;
        update();
      });
    }
    more.addEventListener("click", () => { shown += STEP; draw(); });
    function value(item) { return key === "id" ? String(item.id) : item[key]; }
    function update() {
      order = items.filter((item) => matches(item, isQuery));
      order.sort((a, b) => {
        const c = compare(value(a), value(b));
        return (descending ? -c : c) || a.index - b.index;
      });
      for (const th of table.querySelectorAll("th[data-key]")) {
        th.setAttribute("aria-sort", th.dataset.key === key ? (descending ? "descending" : "ascending") : "none");
      }
      shown = STEP;
      draw();
    }
    function draw() {
      body.replaceChildren(...order.slice(0, shown).map(row));
      more.hidden = order.length <= shown;
      more.textContent = `Show ${Math.min(STEP, order.length - shown)} more (${order.length - shown} not shown)`;
      table.dataset.count = order.length;
    }
    return { update, order: () => order };
  }

  const poisonTag = (s) => (s.meta.poisoned ? tag("poisoned", "poisoned") : null);
  const copiesTag = (s) => (s.copies.count ? tag("copies", `×${s.copies.count + 1} identical`,
    `${s.copies.count + 1} training samples have this instruction, input and response`) : null);
  const queryTags = (q) => [q.meta.attacked ? tag("attacked", "attacked") : null,
    q.meta.generated ? tag("generated", "generated", "the model generated this response") : null];

  const queryIndex = indexTable("query-index", queries, true, (q) => el("tr", { "data-index": q.index },
    el("td", { class: "num" }, String(q.index)), el("td", {}, el("a", { href: `#q${q.index}` }, String(q.id))),
    el("td", {}, queryTags(q)), el("td", { class: "clip" }, q.output),
    el("td", { class: "num" }, fmt(q.top_score)),
    controls.poisoned ? el("td", { class: "num" }, String(q.poisoned_top)) : null));
  const sampleIndex = indexTable("sample-index", [...groups.values()], false, (s) => el("tr", { "data-index": s.index },
    el("td", { class: "num" }, String(s.index)), el("td", {}, el("a", { href: `#s${s.index}` }, String(s.id))),
    el("td", {}, poisonTag(s), copiesTag(s)), el("td", { class: "clip" }, `${s.instruction} → ${s.output}`),
    el("td", { class: "num" }, String(s.helpful)), el("td", { class: "num" }, String(s.harmful))));

  function refresh() {
    queryIndex.update();
    sampleIndex.update();
    document.getElementById("counts").textContent = `${queryIndex.order().length} of ${queries.length} queries, `
      + `${sampleIndex.order().length} of ${groups.size} listed samples`;
  }
  let pending;
  controls.search.addEventListener("input", () => { clearTimeout(pending); pending = setTimeout(refresh, 150); });
  controls.kind.addEventListener("change", refresh);
  if (controls.poisoned) controls.poisoned.addEventListener("change", refresh);

  // One query: its prompt and shaded response, its two lists of samples, its token → token heat map.
  function prompt(item) {
    return el("div", { class: "prompt" }, el("b", {}, "Instruction "), el("span", { class: "text" }, item.instruction),
      item.input ? [el("br"), el("b", {}, "Input "), el("span", { class: "text" }, item.input)] : null);
  }
  function metadata(item, skip) {
    const keys = Object.keys(item.meta).filter((k) => !skip.includes(k));
    return keys.length ? el("p", { class: "meta muted" }, keys.map((k) => `${k}: ${JSON.stringify(item.meta[k])}`).join(" · ")) : null;
  }
  function sampleRow(q, entry) {
    const s = samples[entry[0]], copies = entry[3];
    const own = q.sample_tokens[entry[0]];
    const ranks = copies.length ? `${entry[1]}–${copies[copies.length - 1][1]}` : String(entry[1]);
    return el("tr", { class: s.meta.poisoned ? "poisoned" : null, "data-index": entry[0] },
      el("td", { class: "num" }, ranks), el("td", { class: "num" }, fmt(entry[2])),
      el("td", {}, el("a", { href: `#s${entry[0]}` }, String(s.id)), " ", poisonTag(s),
        copies.length ? tag("copies", `${copies.length + 1} identical samples`,
          `also ${copies.map((c) => `#${c[0]} (rank ${c[1]}, ${fmt(c[2])})`).join(", ")}`) : null,
        el("div", { class: "text" }, s.instruction, s.input ? [el("span", { class: "muted" }, " | "), s.input] : null),
        el("div", { class: "text reply" }, el("span", { class: "muted" }, "→ "),
          own ? tokens(own, q.scale, (t) => `${fmt(t[1])}: this token's influence on the whole response`) : s.output)));
  }
  function matrix(m) {
    const head = el("tr", {}, el("th"), m.columns.map((c) => el("th", { class: "col" }, c)));
    const rows = m.values.map((values, i) => el("tr", {}, el("th", { class: "row" }, m.rows[i]),
      values.map((v, j) => el("td", { style: shade(v, m.scale), title: `${m.rows[i]} → ${m.columns[j]}` },
        Number(v.toPrecision(2)).toString()))));
    return el("details", { class: "matrix-box", open: true },
      el("summary", {}, `Token → token: sample #${m.sample}'s tokens (rows) against the response's tokens (columns)`),
      legend(m.scale, "this heat map's scale:"), el("div", { class: "scroll" }, el("table", { class: "matrix" }, head, rows)));
  }
  function showQuery(q) {
    const order = queryIndex.order(), at = order.indexOf(q);
    const step = (d) => (at >= 0 && order[at + d] ? el("a", { href: `#q${order[at + d].index}` }, d < 0 ? "← previous" : "next →") : null);
    const response = q.tokens
      ? tokens(q.tokens, q.scale, (t) => `${fmt(t[1])} from the top helpful samples; this token's most influential samples: `
        + t[2].map((s) => `#${s[0]} (${fmt(s[1])})`).join(", "))
      : el("span", { class: "text" }, q.output);
    const shadedNote = q.shaded_per_side < topN
      ? `Only the top ${q.shaded_per_side} of the ${topN} samples per side have token shading (tokenwise.top_samples).` : "";
    return el("section", { class: "card query", id: `q${q.index}` },
      el("nav", { class: "steps" }, step(-1), " ", step(1)),
      el("h3", {}, `Query ${q.index} `, el("span", { class: "muted" }, `· ${q.id} `), queryTags(q),
        q.targets.length ? tag("targets", `targets: ${q.targets.join(", ")}`, "the query's loss covers these parts of the response only") : null),
      prompt(q), el("div", { class: "response" }, el("b", {}, "Response "), response), metadata(q, ["attacked", "generated"]),
      q.tokens ? [legend(q.scale, "one colour scale for every text of this query:"), el("p", { class: "muted note" },
        "A response token is shaded by its mean influence from the query's top helpful samples (hover for its own most "
        + `influential samples); a sample's token by its own influence on the whole response. ${shadedNote}`)] : null,
      el("div", { class: "grid" }, ["helpful", "harmful"].map((side) => el("div", { class: `side ${side}` },
        el("h4", {}, q.titles[side]), el("table", { class: "samples" },
          el("tr", {}, el("th", { class: "num" }, "rank"), el("th", { class: "num" }, "score"), el("th", {}, "sample")),
          q[side].length ? q[side].map((entry) => sampleRow(q, entry))
            : el("tr", {}, el("td", { colspan: 3, class: "muted" }, "none: every ranked sample is in the other list")))))),
      q.matrix ? matrix(q.matrix) : null);
  }

  // One training sample: its texts, and every query that lists it (or a sample identical to it).
  function showSample(s) {
    const rows = [];
    for (const q of queries) {
      for (const side of ["helpful", "harmful"]) {
        for (const entry of q[side]) {
          if (samples[entry[0]].group === s.group) rows.push([q, side, entry]);
        }
      }
    }
    const copies = s.copies.count
      ? el("p", { class: "muted" }, `One of ${s.copies.count + 1} identical training samples: the others are `
        + s.copies.indices.map((i) => `#${i}`).join(", ") + (s.copies.count > s.copies.indices.length ? ", …" : "")
        + ". Their scores are the same; each query lists them once.") : null;
    return el("section", { class: "card sample", id: `s${s.index}` },
      el("h3", {}, `Training sample ${s.index} `, el("span", { class: "muted" }, `· ${s.id} `), poisonTag(s), copiesTag(s)),
      prompt(s), el("div", { class: "response" }, el("b", {}, "Response "), el("span", { class: "text" }, s.output)),
      metadata(s, ["poisoned"]), copies,
      el("h4", {}, `Listed by ${rows.length} of the ${queries.length} queries (among the ${topN} shown per side)`),
      el("table", { class: "samples listed" },
        el("tr", {}, el("th", { class: "num" }, "query"), el("th", {}, "id"), el("th", {}, ""), el("th", {}, "list"),
          el("th", { class: "num" }, "rank"), el("th", { class: "num" }, "score")),
        rows.map(([q, side, entry]) => el("tr", { "data-query": q.index, "data-side": side },
          el("td", { class: "num" }, String(q.index)), el("td", {}, el("a", { href: `#q${q.index}` }, String(q.id))),
          el("td", {}, queryTags(q)), el("td", {}, q.titles[side]),
          el("td", { class: "num" }, String(entry[1])), el("td", { class: "num" }, fmt(entry[2]))))));
  }

  const view = document.getElementById("view");
  function route() {
    const match = location.hash.match(/^#([qs])(\d+)$/);
    const item = match && (match[1] === "q" ? byIndex.get(Number(match[2])) : samples[match[2]]);
    const shown = item ? (match[1] === "q" ? showQuery(item) : showSample(item)) : queries.length ? showQuery(queries[0]) : null;
    view.replaceChildren(...(shown ? [shown] : []));
    if (item) view.scrollIntoView();
  }
  window.addEventListener("hashchange", route);
  refresh();
  route();
  document.body.dataset.ready = "true";
})();
