/* The review gallery's behaviour (written by pipeline/review.py).
   Every page: images that fail to load are counted on their container (data-images-loaded,
   data-images-broken) and a note says how many are missing.
   A concept-set page: sort, filter and page the samples of window.REVIEW_DATA. State lives in the
   URL hash (#sort=clip_t&dir=desc&filter=clip_t&min=20&status=rejected&page=2), so a view can be
   linked and reloaded (#boxes=off: the boxes of run --annotate hidden). Only one page of thumbnails is in the DOM at a time. */
function watchImages(container, note) {
  "use strict";
  const images = Array.from(container.querySelectorAll("img"));
  let loaded = 0, broken = 0;
  function settle() {
    if (loaded + broken < images.length) return;
    container.dataset.imagesLoaded = String(loaded);
    container.dataset.imagesBroken = String(broken);
    if (note) note.textContent = broken ? broken + " images missing: rerun freecustom-pipeline review" : "";
  }
  for (const img of images) {
    if (img.complete) { img.naturalWidth ? loaded++ : broken++; continue; }
    img.addEventListener("load", () => { loaded++; settle(); }, { once: true });
    img.addEventListener("error", () => { broken++; settle(); }, { once: true });
  }
  settle();
}

if (!window.REVIEW_DATA) {
  watchImages(document.body, document.getElementById("missing"));
} else (function () {
  "use strict";
  const start = performance.now();
  const D = window.REVIEW_DATA;
  const S = D.samples;
  const n = S.key.length;
  const PER_CONCEPT = new Set(D.per_concept);

  // one number per sample and score: a per-concept score's minimum over concepts (NaN: not scored)
  const value = {};
  for (const name of D.scores) {
    const col = S.scores[name] || [];
    const arr = new Float64Array(n);
    for (let i = 0; i < n; i++) {
      const v = col[i];
      arr[i] = v == null ? NaN : Array.isArray(v) ? (v.length ? Math.min.apply(null, v) : NaN) : v;
    }
    value[name] = arr;
  }

  const COLOURS = ["#ff4040", "#40a0ff", "#40dc60", "#ffc800", "#c860ff", "#00dcdc"]; // stages.previews'
  const $ = (id) => document.getElementById(id);
  const controls = { sort: $("sort"), dir: $("dir"), filter: $("filter"), min: $("min"), status: $("status") };
  const grid = $("samples");
  const count = $("count");

  function readHash() {
    const p = new URLSearchParams(location.hash.slice(1));
    const sorts = ["key", "seed", ...D.scores];
    return {
      sort: sorts.includes(p.get("sort")) ? p.get("sort") : "key",
      dir: p.get("dir") === "desc" ? "desc" : "asc",
      filter: D.scores.includes(p.get("filter")) ? p.get("filter") : "",
      min: p.get("min") !== null && p.get("min") !== "" && isFinite(+p.get("min")) ? +p.get("min") : null,
      status: ["accepted", "rejected"].includes(p.get("status")) ? p.get("status") : "all",
      page: Math.max(1, parseInt(p.get("page") || "1", 10) || 1),
      boxes: p.get("boxes") !== "off",
    };
  }

  function writeHash(state) {
    const p = new URLSearchParams();
    if (state.sort !== "key") p.set("sort", state.sort);
    if (state.dir !== "asc") p.set("dir", state.dir);
    if (state.filter) p.set("filter", state.filter);
    if (state.filter && state.min !== null) p.set("min", String(state.min));
    if (state.status !== "all") p.set("status", state.status);
    if (state.page > 1) p.set("page", String(state.page));
    if (!state.boxes) p.set("boxes", "off");
    const hash = p.toString();
    if (hash !== location.hash.slice(1)) location.hash = hash;
    else render();
  }

  function selected(state) {
    const keep = [];
    const f = state.filter ? value[state.filter] : null;
    for (let i = 0; i < n; i++) {
      const rejected = S.rejected[i] != null;
      if (state.status === "accepted" && rejected) continue;
      if (state.status === "rejected" && !rejected) continue;
      if (f && state.min !== null && !(f[i] >= state.min)) continue;
      keep.push(i);
    }
    const sign = state.dir === "desc" ? -1 : 1;
    if (state.sort === "key") keep.sort((a, b) => sign * (S.key[a] < S.key[b] ? -1 : S.key[a] > S.key[b] ? 1 : 0));
    else if (state.sort === "seed") keep.sort((a, b) => sign * (S.seed[a] - S.seed[b]) || a - b);
    else {
      const v = value[state.sort];
      keep.sort((a, b) => {
        const x = v[a], y = v[b];
        if (isNaN(x) || isNaN(y)) return isNaN(x) - isNaN(y) || a - b; // not scored: last
        return sign * (x - y) || a - b;
      });
    }
    return keep;
  }

  function fmt(v) {
    return v == null ? "-" : Array.isArray(v) ? v.map(fmt).join(" / ") : Number(v).toFixed(Math.abs(v) >= 10 ? 2 : 3);
  }

  function card(i) {
    const li = document.createElement("li");
    const fig = document.createElement("figure");
    fig.className = "sample" + (S.rejected[i] != null ? " rejected" : "");
    fig.tabIndex = 0;
    fig.dataset.key = S.key[i];
    const prompt = D.prompts[S.prompt[i]];
    const img = document.createElement("img");
    img.src = "../" + D.thumb_dirs[S.dir[i]] + "/" + encodeURIComponent(S.key[i]) + ".jpg";
    img.alt = "Sample " + S.key[i] + " (seed " + S.seed[i] + "): " + prompt;
    img.width = D.thumb_size;
    img.height = D.thumb_size;
    img.decoding = "async";
    const boxes = S.boxes ? S.boxes[i] : null;
    if (boxes) {
      // where each concept landed (run --annotate): one outlined box per concept over the thumbnail, in the
      // image's pixels (the SVG's viewBox), scaled as the image is (object-fit: contain)
      // (parsed as HTML, which puts <svg> in the SVG namespace; every value is a number or a constant)
      const wrap = document.createElement("div");
      wrap.className = "thumb";
      wrap.appendChild(img);
      const num = (v) => String(Number(v));
      const rects = boxes.map((b, j) =>
        '<rect x="' + num(b[0]) + '" y="' + num(b[1]) + '" width="' + num(b[2] - b[0]) + '" height="' + num(b[3] - b[1]) +
        '" stroke="' + COLOURS[j % COLOURS.length] + '" data-concept="' + j + '"></rect>').join("");
      wrap.insertAdjacentHTML("beforeend", '<svg class="boxes" viewBox="0 0 ' + num(S.size[i][0]) + " " +
        num(S.size[i][1]) + '" preserveAspectRatio="xMidYMid meet" aria-hidden="true">' + rects + "</svg>");
      fig.appendChild(wrap);
    } else {
      fig.appendChild(img);
    }
    const cap = document.createElement("figcaption");
    const key = document.createElement("div");
    key.className = "key";
    key.textContent = S.key[i] + " · seed " + S.seed[i];
    cap.appendChild(key);
    if (S.rejected[i] != null) {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = "rejected: " + S.rejected[i];
      cap.appendChild(badge);
    }
    const p = document.createElement("div");
    p.className = "prompt";
    p.textContent = prompt;
    cap.appendChild(p);
    const dl = document.createElement("dl");
    for (const name of D.scores) {
      const dt = document.createElement("dt");
      dt.textContent = name + (PER_CONCEPT.has(name) ? "*" : "");
      const dd = document.createElement("dd");
      dd.textContent = fmt((S.scores[name] || [])[i]);
      dd.dataset.score = name;
      dl.append(dt, dd);
    }
    cap.appendChild(dl);
    const extras = S.extras ? S.extras[i] : [];
    if (extras.length) {
      // further fields (stages.output.extra_fields): attention panels (run --save-attention), one heat-map
      // panel per concept; control conditions (run --controlnet), one per ControlNet. Each labelled.
      const box = document.createElement("div");
      box.className = "extras";
      for (const x of extras) {
        const e = D.extras[x];
        const item = document.createElement("div");
        item.className = "extra extra-" + e.kind;
        const label = document.createElement("div");
        label.className = "extra-label";
        label.textContent = e.label;
        const thumb = document.createElement("img");
        thumb.className = e.kind;
        thumb.src = "../" + D.thumb_dirs[S.dir[i]] + "/" + encodeURIComponent(S.key[i]) + "." + e.thumb;
        thumb.alt = e.alt.replace("{key}", () => S.key[i]);
        thumb.decoding = "async";
        item.append(label, thumb);
        box.appendChild(item);
      }
      cap.appendChild(box);
    }
    fig.appendChild(cap);
    li.appendChild(fig);
    return li;
  }

  let current = null;

  function render() {
    const state = readHash();
    current = state;
    for (const k of ["sort", "dir", "filter", "status"]) controls[k].value = state[k];
    controls.min.value = state.min === null ? "" : String(state.min);
    const keep = selected(state);
    const pages = Math.max(1, Math.ceil(keep.length / D.page_size));
    state.page = Math.min(state.page, pages);
    const from = (state.page - 1) * D.page_size;
    const shown = keep.slice(from, from + D.page_size);
    if ($("show-boxes")) $("show-boxes").checked = state.boxes;
    grid.classList.toggle("hide-boxes", !state.boxes);
    const frag = document.createDocumentFragment();
    for (const i of shown) frag.appendChild(card(i));
    grid.replaceChildren(frag);
    watchImages(grid, $("missing"));
    count.textContent = keep.length
      ? "Showing " + (from + 1) + "–" + (from + shown.length) + " of " + keep.length +
        (keep.length !== n ? " (filtered from " + n + ")" : "") + " samples"
      : "No samples match (" + n + " in this concept set)";
    count.dataset.matching = String(keep.length);
    count.dataset.total = String(n);
    for (const id of ["page-info", "page-info-bottom"]) $(id).textContent = "Page " + state.page + " of " + pages;
    for (const id of ["prev", "prev-bottom"]) $(id).disabled = state.page <= 1;
    for (const id of ["next", "next-bottom"]) $(id).disabled = state.page >= pages;
    document.body.dataset.page = String(state.page);
    document.body.dataset.pages = String(pages);
    document.body.dataset.renderMs = String(Math.round(performance.now() - start));
  }

  function update(changes) {
    writeHash(Object.assign({}, current, { page: 1 }, changes));
  }

  controls.sort.addEventListener("change", () => update({ sort: controls.sort.value }));
  controls.dir.addEventListener("change", () => update({ dir: controls.dir.value }));
  controls.filter.addEventListener("change", () => update({ filter: controls.filter.value }));
  controls.status.addEventListener("change", () => update({ status: controls.status.value }));
  controls.min.addEventListener("change", () =>
    update({ min: controls.min.value === "" ? null : +controls.min.value }));
  function page(delta) {
    writeHash(Object.assign({}, current, { page: current.page + delta }));
    grid.focus();
  }
  for (const id of ["prev", "prev-bottom"]) $(id).addEventListener("click", () => page(-1));
  for (const id of ["next", "next-bottom"]) $(id).addEventListener("click", () => page(1));

  // keyboard: arrows move between thumbnails (up/down by a row), PageUp / PageDown turn pages
  grid.addEventListener("keydown", (e) => {
    const items = Array.from(grid.querySelectorAll(".sample"));
    const at = items.indexOf(document.activeElement);
    if (e.key === "PageDown" || e.key === "PageUp") {
      e.preventDefault();
      if (e.key === "PageDown" && !$("next").disabled) page(1);
      if (e.key === "PageUp" && !$("prev").disabled) page(-1);
      return;
    }
    if (at < 0 || !items.length) return;
    const top = items[0].offsetTop;
    let columns = items.findIndex((el) => el.offsetTop !== top);
    if (columns < 1) columns = items.length;
    const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: columns, ArrowUp: -columns, Home: -at, End: items.length - 1 - at }[e.key];
    if (step === undefined) return;
    e.preventDefault();
    items[Math.max(0, Math.min(items.length - 1, at + step))].focus();
  });
  // the boxes' checkbox (annotated outputs only): shows or hides every box at once (#boxes=off: hidden)
  const showBoxes = $("show-boxes");
  if (showBoxes) showBoxes.addEventListener("change", () =>
    writeHash(Object.assign({}, current, { boxes: showBoxes.checked })));
  window.addEventListener("hashchange", render);
  render();
})();
