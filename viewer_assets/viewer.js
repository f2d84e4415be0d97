/* cosegment viewer: every result of a run on one page, offline (no server, no network, no dependency).
 *
 * Data: the manifest (inline JSON) describes the collection; each image's data (JPEG, maps, overlays, transfers)
 * and each pair's matches come from `cosegmentViewer.registerImage(i, record)` / `registerPair(s, t, record)`,
 * either inline (notebook form) or from `viewer/*.js` scripts added when needed (fetch is blocked under file://).
 *
 * DOM for scripts and tests: every displayed image element has `data-image-index`; every mark (`.mark`) has
 * `data-image-index`, `data-x`, `data-y` (that image's own pixels), `data-score`, `data-point` and `data-role`
 * ("source": the clicked point snapped to its token centre, score 1; "transfer": where it goes).
 */
(function () {
  "use strict";
  var V = (window.cosegmentViewer = window.cosegmentViewer || {});
  var SVG = "http://www.w3.org/2000/svg";
  var POINT_COLORS = ["#e6194b", "#1f78ff", "#3cb44b", "#f58231", "#911eb4", "#00b3b3", "#f032e6", "#9a6324",
    "#808000", "#000075"];
  var M = null; // the manifest
  var raw = { images: {}, pairs: {} };
  var decoded = {};
  var waiting = {};
  var requested = {};
  var cards = [];
  var points = [];
  var nextPoint = 1;
  var overlay = "none";
  var built = false;

  // --- data ---------------------------------------------------------------------------------------------------

  V.registerImage = function (i, record) {
    raw.images[i] = record;
    settle("image" + i, true);
    if (built) renderCard(i);
  };
  V.registerPair = function (s, t, record) {
    raw.pairs[s + "-" + t] = record;
    settle("pair" + s + "-" + t, true);
  };

  function settle(key, ok, error) {
    (waiting[key] || []).forEach(function (w) { if (ok) w[0](); else w[1](error); });
    delete waiting[key];
  }

  function need(key, src, present) {
    if (present()) return Promise.resolve();
    return new Promise(function (resolve, reject) {
      (waiting[key] = waiting[key] || []).push([resolve, reject]);
      if (requested[key]) return;
      requested[key] = true;
      var script = document.createElement("script");
      script.src = src;
      script.onerror = function () {
        requested[key] = false;
        settle(key, false, new Error("could not load " + src + " (is the viewer/ folder beside index.html?)"));
      };
      document.head.appendChild(script);
    });
  }

  function loadImage(i) {
    return need("image" + i, M.images[i].file, function () { return i in raw.images; });
  }

  function loadPair(s, t) {
    var entry = pairEntry(s, t);
    return need("pair" + s + "-" + t, entry.file, function () { return (s + "-" + t) in raw.pairs; });
  }

  function floats(b64) {
    var text = atob(b64), bytes = new Uint8Array(text.length);
    for (var k = 0; k < text.length; k++) bytes[k] = text.charCodeAt(k);
    return new Float32Array(bytes.buffer);
  }

  function imageData(i) {
    if (!decoded[i]) {
      var record = raw.images[i];
      decoded[i] = { maps: floats(record.maps), transfers: {} };
      Object.keys(record.transfers).forEach(function (j) { decoded[i].transfers[j] = floats(record.transfers[j]); });
    }
    return decoded[i];
  }

  function pairEntry(s, t) {
    return M.pairs.filter(function (p) { return p.source === s && p.target === t; })[0];
  }

  // --- small DOM helpers --------------------------------------------------------------------------------------

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svgEl(tag, attrs) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    return node;
  }

  function fmt(v, digits) { return Number(v).toFixed(digits === undefined ? 1 : digits); }
  function num(v) { return Math.abs(v) >= 1000 || v === Math.round(v) ? String(Math.round(v * 100) / 100) : Number(v).toPrecision(3); }
  function status(text) { document.getElementById("status").textContent = text || "\u00a0"; }
  function jet(level) { var h = M.jet.substr(level * 6, 6); return [parseInt(h.substr(0, 2), 16), parseInt(h.substr(2, 2), 16), parseInt(h.substr(4, 2), 16)]; }
  function pointColor(id) { return POINT_COLORS[(id - 1) % POINT_COLORS.length]; }

  // --- page ---------------------------------------------------------------------------------------------------

  function buildHeader() {
    var n = M.grid[0] * M.grid[1], count = M.images.length;
    document.getElementById("title").textContent = M.title;
    document.getElementById("summary").textContent = count + " images \u00b7 token grid " + M.grid[0] + " \u00d7 " +
      M.grid[1] + " (" + n + " tokens per image) \u00b7 " + M.pairs.length + " pairs analysed (" +
      (M.all_pairs ? "every pair" : "partner graph") + ")" + (M.segmented ? "" : " \u00b7 no segmentation");
    document.getElementById("hint").textContent = M.transfers
      ? "Click any image: the point snaps to the nearest token centre (ring, numbered); in every image analysed with " +
        "that one, a disc marks where the centre goes \u2014 exactly what transfer_points(features, i, j, [centre], refine=" +
        (M.refine ? "True" : "False") + ") returns (precomputed for every token centre). Disc opacity = score (0\u20131: faint = unreliable); " +
        "hover a mark for its numbers."
      : "This page was written without the captured features, so clicks place a point but show no transfers " +
        "(write_viewer(..., features=...) or return_features=True adds them).";
  }

  function buildOverlays() {
    var box = document.getElementById("overlays");
    var options = [["none", "photo only"], ["mask", "common mask"], ["parts", "parts"]];
    M.maps.forEach(function (m) { options.push([m.key, m.title]); });
    options.forEach(function (o) {
      var disabled = (o[0] === "mask" || o[0] === "parts") && !M.segmented;
      var input = el("input", { type: "radio", name: "overlay", value: o[0], id: "overlay-" + o[0] });
      if (disabled) input.disabled = true;
      if (o[0] === "none") input.checked = true;
      var label = el("label", { "for": "overlay-" + o[0], "class": disabled ? "off" : o[0] === "none" ? "on" : "" });
      label.appendChild(input);
      label.appendChild(document.createTextNode(o[1]));
      box.appendChild(label);
      input.addEventListener("change", function () { setOverlay(o[0]); });
    });
  }

  function setOverlay(key) {
    overlay = key;
    document.body.setAttribute("data-overlay", key);
    document.querySelectorAll("#overlays label").forEach(function (label) {
      var input = label.querySelector("input");
      input.checked = input.value === key;
      label.classList.toggle("on", input.value === key);
    });
    cards.forEach(function (card, i) { if (card.loaded) drawMap(i); });
    buildLegend();
  }

  function buildLegend() {
    var box = document.getElementById("legend");
    box.textContent = "";
    var item = function (html) { var s = el("span"); s.innerHTML = html; box.appendChild(s); };
    var swatch = function (rgb) { return '<span class="swatch" style="background: rgb(' + rgb.join(",") + ')"></span>'; };
    if (overlay === "none") {
      item("Legend: pick an overlay above. Red frame = outlier image (shares nothing with the rest).");
    } else if (overlay === "mask") {
      item(swatch([0, 200, 0]) + "common foreground (mask)");
      item(swatch([64, 64, 64]) + "background (darkened)");
    } else if (overlay === "parts") {
      if (!M.parts.length) item("no part found");
      M.parts.forEach(function (p) { item(swatch(p.color) + "part " + p.id); });
      item('<span class="swatch" style="background:#888; border: 2px solid #fff; box-shadow: 0 0 0 1px #777"></span>part centre (keypoint)');
      item("(one id = the same part in every image)");
    } else {
      var m = M.maps.filter(function (x) { return x.key === overlay; })[0];
      if (m.range[0] === m.range[1]) {
        item(m.title + ": every value is " + num(m.range[0]) + " (" + m.unit + ")");
        return;
      }
      var bar = el("span", { "class": "colorbar" });
      var canvas = el("canvas", { width: 256, height: 1 });
      var ctx = canvas.getContext("2d"), img = ctx.createImageData(256, 1);
      for (var k = 0; k < 256; k++) { var c = jet(k); img.data.set([c[0], c[1], c[2], 255], 4 * k); }
      ctx.putImageData(img, 0, 0);
      bar.appendChild(el("b", {}, num(m.range[0])));
      bar.appendChild(canvas);
      bar.appendChild(el("b", {}, num(m.range[1])));
      box.appendChild(bar);
      item(m.title + ": " + m.unit + " \u00b7 one scale for every image \u00b7 one cell per token");
    }
  }

  function buildCard(i) {
    var e = M.images[i];
    var card = el("div", { "class": "card" + (e.outlier ? " outlier" : ""), id: "card-" + i, "data-image-index": i });
    var head = el("div", { "class": "card-head" });
    head.appendChild(el("span", { "class": "name" }, i + " \u00b7 " + e.name));
    if (e.outlier) head.appendChild(el("span", { "class": "badge", title: "shares nothing with the collection" }, "outlier"));
    var meta = [e.width + "\u00d7" + e.height + " px"];
    if (e.sharing !== null) meta.push("sharing " + fmt(e.sharing, 2));
    if (e.foreground !== undefined) meta.push("mask " + Math.round(100 * e.foreground) + "%");
    if (!M.all_pairs) meta.push("partners " + (e.partners.join(", ") || "none"));
    head.appendChild(el("div", { "class": "meta" }, meta.join(" \u00b7 ")));
    var stage = el("div", { "class": "stage", style: "aspect-ratio: " + e.width + " / " + e.height });
    stage.appendChild(el("div", { "class": "loading" }, "loading\u2026"));
    var foot = el("div", { "class": "card-foot" });
    card.appendChild(head);
    card.appendChild(stage);
    card.appendChild(foot);
    stage.addEventListener("click", function (ev) { onClick(ev, i); });
    cards[i] = { card: card, stage: stage, foot: foot, loaded: false };
    return card;
  }

  function renderCard(i) {
    var c = cards[i], e = M.images[i], record = raw.images[i];
    if (!c || c.loaded || !record) return;
    c.stage.textContent = "";
    c.stage.appendChild(el("img", { "class": "photo", src: record.image, alt: e.name, "data-image-index": i, draggable: "false" }));
    if (record.mask) c.stage.appendChild(el("img", { "class": "ov ov-mask", src: record.mask, alt: "", "data-image-index": i }));
    if (record.parts) c.stage.appendChild(el("img", { "class": "ov ov-parts", src: record.parts, alt: "", "data-image-index": i }));
    c.canvas = el("canvas", { "class": "ov ov-map", width: M.grid[1], height: M.grid[0], "data-image-index": i });
    c.stage.appendChild(c.canvas);
    c.svg = svgEl("svg", { viewBox: "0 0 " + e.width + " " + e.height, preserveAspectRatio: "none" });
    c.keypoints = svgEl("g", { "class": "ov ov-keypoints" });
    c.marks = svgEl("g", { "class": "marks" });
    c.svg.appendChild(c.keypoints);
    c.svg.appendChild(c.marks);
    c.stage.appendChild(c.svg);
    c.loaded = true;
    c.card.setAttribute("data-loaded", "1");
    drawKeypoints(i);
    drawMap(i);
    renderMarks(i);
  }

  function radius(i) {
    var width = cards[i].stage.clientWidth || parseFloat(getComputedStyle(document.documentElement).getPropertyValue("--card"));
    return 7 * M.images[i].width / Math.max(width, 1);
  }

  function drawKeypoints(i) {
    var c = cards[i], r = radius(i) * 0.75;
    c.keypoints.textContent = "";
    (raw.images[i].keypoints || []).forEach(function (kp) {
      var part = M.parts.filter(function (p) { return p.id === kp[2]; })[0];
      var color = part ? "rgb(" + part.color.join(",") + ")" : "#888";
      c.keypoints.appendChild(svgEl("rect", { "class": "keypoint", x: kp[0] - r, y: kp[1] - r, width: 2 * r, height: 2 * r,
        fill: color, stroke: "#fff", "stroke-width": 2, "vector-effect": "non-scaling-stroke" }));
    });
  }

  function drawMap(i) {
    var m = -1;
    M.maps.forEach(function (x, k) { if (x.key === overlay) m = k; });
    if (m < 0) return;
    var h = M.grid[0], w = M.grid[1], values = imageData(i).maps, lo = M.maps[m].range[0], hi = M.maps[m].range[1];
    var canvas = cards[i].canvas, ctx = canvas.getContext("2d"), img = ctx.createImageData(w, h);
    for (var k = 0; k < h * w; k++) {
      var v = values[m * h * w + k];
      if (!isFinite(v)) continue; // transparent: the photo shows through
      var level = hi > lo ? Math.round(Math.min(1, Math.max(0, (v - lo) / (hi - lo))) * 255) : 0;
      var c = jet(level);
      img.data.set([c[0], c[1], c[2], 255], 4 * k);
    }
    ctx.putImageData(img, 0, 0);
    canvas.setAttribute("data-map", M.maps[m].key);
  }

  // --- points -------------------------------------------------------------------------------------------------

  function onClick(ev, i) {
    var c = cards[i], e = M.images[i];
    if (!c.loaded) return;
    var rect = c.stage.getBoundingClientRect();
    var x = (ev.clientX - rect.left) / rect.width * e.width, y = (ev.clientY - rect.top) / rect.height * e.height;
    var h = M.grid[0], w = M.grid[1];
    var col = Math.min(w - 1, Math.max(0, Math.floor(x * w / e.width)));
    var row = Math.min(h - 1, Math.max(0, Math.floor(y * h / e.height)));
    // the token centre, computed as cosegment.viewer.token_centres computes it (same float64 operations)
    points.push({ id: nextPoint++, source: i, token: row * w + col, row: row, col: col,
      x: (col + 0.5) * (e.width / w), y: (row + 0.5) * (e.height / h) });
    renderAllMarks();
  }

  function transferOf(p, j) {
    var t = imageData(p.source).transfers[j];
    if (!t) return null;
    return { x: t[3 * p.token], y: t[3 * p.token + 1], score: t[3 * p.token + 2] };
  }

  function addMark(i, p, role, x, y, score, r) {
    var c = cards[i], color = pointColor(p.id);
    var g = svgEl("g", { "class": "mark " + role, "data-image-index": i, "data-source-index": p.source, "data-point": p.id,
      "data-role": role, "data-x": String(x), "data-y": String(y), "data-score": String(score) });
    if (role === "source") {
      g.appendChild(svgEl("circle", { cx: x, cy: y, r: r * 1.25, fill: "none", stroke: "#fff", "stroke-width": 6, "vector-effect": "non-scaling-stroke" }));
      g.appendChild(svgEl("circle", { cx: x, cy: y, r: r * 1.25, fill: "none", stroke: color, "stroke-width": 3.5, "vector-effect": "non-scaling-stroke" }));
    } else {
      g.setAttribute("opacity", String(0.3 + 0.7 * score));
      g.appendChild(svgEl("circle", { cx: x, cy: y, r: r, fill: color, stroke: "#fff", "stroke-width": 2, "vector-effect": "non-scaling-stroke" }));
    }
    var label = svgEl("text", { x: x, y: y, "font-size": r * 1.3, "stroke-width": r * 0.3 });
    label.textContent = p.id;
    g.appendChild(label);
    var text = role === "source"
      ? "point " + p.id + ": image " + i + ", token (row " + p.row + ", col " + p.col + ") centre at (" + fmt(x) + ", " + fmt(y) + ") px"
      : "point " + p.id + " of image " + p.source + " \u2192 image " + i + " at (" + fmt(x) + ", " + fmt(y) + ") px, score " + fmt(score, 3);
    var title = svgEl("title");
    title.textContent = text;
    g.appendChild(title);
    g.addEventListener("mouseenter", function () { status(text); });
    c.marks.appendChild(g);
  }

  function renderMarks(i) {
    var c = cards[i];
    if (!c || !c.loaded) return;
    c.marks.textContent = "";
    c.foot.textContent = "";
    var r = radius(i);
    points.forEach(function (p) {
      var note = el("span", { style: "color:" + pointColor(p.id) });
      if (p.source === i) {
        addMark(i, p, "source", p.x, p.y, 1, r);
        note.textContent = p.id + ": clicked";
      } else if (!M.transfers) {
        note.textContent = p.id + ": no features";
      } else {
        var t = transferOf(p, i);
        if (t) { addMark(i, p, "transfer", t.x, t.y, t.score, r); note.textContent = p.id + ": score " + (t.score < 0.01 ? "<0.01" : fmt(t.score, 2)); }
        else note.textContent = p.id + ": not analysed with " + p.source;
      }
      c.foot.appendChild(note);
    });
  }

  function renderAllMarks() {
    cards.forEach(function (c, i) { renderMarks(i); });
    var list = document.getElementById("point-list");
    list.textContent = "";
    points.forEach(function (p) {
      var chip = el("span", { "class": "chip", style: "background:" + pointColor(p.id), title: "click to remove" },
        p.id + ": image " + p.source + " (" + fmt(p.x) + ", " + fmt(p.y) + ") \u00d7");
      chip.addEventListener("click", function () { points = points.filter(function (q) { return q !== p; }); renderAllMarks(); });
      list.appendChild(chip);
    });
  }

  // --- pairs --------------------------------------------------------------------------------------------------

  function buildPairTable() {
    var sort = document.getElementById("pair-sort").value, filter = document.getElementById("pair-filter").value;
    var rows = M.pairs.slice();
    if (filter !== "") rows = rows.filter(function (p) { return p.source === Number(filter) || p.target === Number(filter); });
    if (sort === "matches") rows.sort(function (a, b) { return b.matches - a.matches || a.source - b.source || a.target - b.target; });
    var most = Math.max.apply(null, M.pairs.map(function (p) { return p.matches; }).concat([1]));
    var body = document.querySelector("#pair-table tbody");
    body.textContent = "";
    rows.forEach(function (p) {
      var tr = el("tr", { "data-source-index": p.source, "data-target-index": p.target, "data-matches": p.matches });
      tr.appendChild(el("td", {}, p.source + " \u2013 " + p.target + "  (" + M.images[p.source].name + " \u2013 " + M.images[p.target].name + ")"));
      tr.appendChild(el("td", {}, String(p.matches)));
      tr.appendChild(el("td", {}, String(p.mutual)));
      var cell = el("td");
      cell.appendChild(el("span", { "class": "bar", style: "width:" + Math.round(120 * p.matches / most) + "px" }));
      tr.appendChild(cell);
      tr.addEventListener("click", function () { openPair(p.source, p.target); });
      body.appendChild(tr);
    });
    document.getElementById("pair-count").textContent = rows.length + " of " + M.pairs.length + " pairs; click one to see its matches";
  }

  function openPair(s, t) {
    var view = document.getElementById("pair-view");
    view.hidden = false;
    view.setAttribute("data-source-index", s);
    view.setAttribute("data-target-index", t);
    document.getElementById("pair-canvas").textContent = "loading\u2026";
    Promise.all([loadImage(s), loadImage(t), loadPair(s, t)]).then(function () { drawPair(s, t); }, function (error) {
      document.getElementById("pair-canvas").textContent = String(error.message || error);
    });
  }

  function matchColor(x, y, e) {
    var hue = Math.min(1, Math.max(0, x / e.width)) * 300, light = 50 * (155 + 100 * Math.min(1, Math.max(0, y / e.height))) / 255;
    return "hsl(" + hue.toFixed(0) + ",100%," + light.toFixed(0) + "%)";
  }

  function drawPair(s, t) {
    var view = document.getElementById("pair-view");
    if (view.hidden || Number(view.getAttribute("data-source-index")) !== s || Number(view.getAttribute("data-target-index")) !== t) return;
    var a = M.images[s], b = M.images[t], entry = pairEntry(s, t), record = raw.pairs[s + "-" + t];
    var table = floats(record.matches), count = entry.matches, gap = 16;
    var room = Math.max(320, window.innerWidth - 120) - gap; // the two images side by side at one height
    var height = Math.round(Math.min(1.5 * Math.max(a.display[1], b.display[1]), 0.8 * window.innerHeight,
      room / (a.width / a.height + b.width / b.height)));
    var sa = height / a.height, sb = height / b.height, offset = a.width * sa + gap;
    var width = offset + b.width * sb;
    var svg = svgEl("svg", { width: width, height: height, viewBox: "0 0 " + width + " " + height });
    svg.appendChild(svgEl("image", { href: raw.images[s].image, x: 0, y: 0, width: a.width * sa, height: height, "data-image-index": s, preserveAspectRatio: "none" }));
    svg.appendChild(svgEl("image", { href: raw.images[t].image, x: offset, y: 0, width: b.width * sb, height: height, "data-image-index": t, preserveAspectRatio: "none" }));
    var order = [];
    for (var k = 0; k < count; k++) order.push(k);
    order.sort(function (p, q) { return table[5 * q + 4] - table[5 * p + 4] || p - q; });
    var top = Math.max(0, Math.min(count, parseInt(document.getElementById("pair-top").value, 10) || 0));
    var pairStatus = document.getElementById("pair-status");
    order.slice(0, top).reverse().forEach(function (k, back) { // the best drawn last, on top
      var rank = top - 1 - back;
      var m = table.subarray(5 * k, 5 * k + 5), mutual = record.mutual.charAt(k) === "1";
      var g = svgEl("g", { "class": "match", "data-score": String(m[4]), "data-rank": rank + 1, "data-mutual": mutual ? "1" : "0" });
      var ends = { x1: m[0] * sa, y1: m[1] * sa, x2: offset + m[2] * sb, y2: m[3] * sb };
      var seen = svgEl("line", Object.assign({ "class": "seen", stroke: matchColor(m[0], m[1], a), "stroke-width": 1.5 }, ends));
      var hit = svgEl("line", Object.assign({ "class": "hit" }, ends));
      var text = "match " + (rank + 1) + " of " + count + ": (" + fmt(m[0]) + ", " + fmt(m[1]) + ") px in image " + s + " \u2192 (" +
        fmt(m[2]) + ", " + fmt(m[3]) + ") px in image " + t + " \u00b7 score " + fmt(m[4], 3) + (mutual ? " \u00b7 mutual" : "");
      var title = svgEl("title");
      title.textContent = text;
      g.appendChild(seen);
      g.appendChild(svgEl("circle", { cx: ends.x1, cy: ends.y1, r: 2.5, fill: seen.getAttribute("stroke") }));
      g.appendChild(svgEl("circle", { cx: ends.x2, cy: ends.y2, r: 2.5, fill: seen.getAttribute("stroke") }));
      g.appendChild(hit);
      g.appendChild(title);
      g.addEventListener("mouseenter", function () { pairStatus.textContent = text; });
      svg.appendChild(g);
    });
    document.getElementById("pair-title").textContent = "images " + s + " (" + a.name + ") \u2013 " + t + " (" + b.name + "): " +
      count + " matches, " + entry.mutual + " mutual";
    var box = document.getElementById("pair-canvas");
    box.textContent = "";
    if (!count) box.appendChild(el("p", {}, "No match was kept for this pair."));
    box.appendChild(svg);
  }

  function closePair() {
    document.getElementById("pair-view").hidden = true;
  }

  // --- start --------------------------------------------------------------------------------------------------

  function build() {
    M = JSON.parse(document.getElementById("cosegment-manifest").textContent);
    var size = M.images.length <= 8 ? 320 : 220;
    document.getElementById("card-size").value = size;
    document.documentElement.style.setProperty("--card", size + "px");
    buildHeader();
    buildOverlays();
    buildLegend();
    var gallery = document.getElementById("gallery");
    M.images.forEach(function (e, i) { gallery.appendChild(buildCard(i)); });
    built = true;
    var observer = "IntersectionObserver" in window ? new IntersectionObserver(function (seen) {
      seen.forEach(function (entry) {
        if (!entry.isIntersecting) return;
        var i = Number(entry.target.getAttribute("data-image-index"));
        observer.unobserve(entry.target);
        loadImage(i).then(function () { renderCard(i); }, function (error) { cards[i].stage.textContent = error.message; });
      });
    }, { rootMargin: "600px" }) : null;
    cards.forEach(function (c, i) { if (observer) observer.observe(c.card); else loadImage(i).then(function () { renderCard(i); }); });
    document.getElementById("overlay-opacity").addEventListener("input", function (ev) {
      document.documentElement.style.setProperty("--map-alpha", ev.target.value);
    });
    document.getElementById("card-size").addEventListener("input", function (ev) {
      document.documentElement.style.setProperty("--card", ev.target.value + "px");
      cards.forEach(function (c, i) { if (c.loaded) { drawKeypoints(i); renderMarks(i); } });
    });
    document.getElementById("clear-points").addEventListener("click", function () { points = []; nextPoint = 1; renderAllMarks(); });
    document.getElementById("pair-sort").addEventListener("change", buildPairTable);
    document.getElementById("pair-filter").addEventListener("input", buildPairTable);
    document.getElementById("pair-top").addEventListener("change", function () {
      var view = document.getElementById("pair-view");
      drawPair(Number(view.getAttribute("data-source-index")), Number(view.getAttribute("data-target-index")));
    });
    document.getElementById("pair-close").addEventListener("click", closePair);
    document.getElementById("pair-view").addEventListener("click", function (ev) { if (ev.target.id === "pair-view") closePair(); });
    document.addEventListener("keydown", function (ev) { if (ev.key === "Escape") closePair(); });
    buildPairTable();
    document.documentElement.setAttribute("data-viewer-ready", "1");
  }

  V.api = {
    openPair: openPair,
    setOverlay: setOverlay,
    clearPoints: function () { points = []; nextPoint = 1; renderAllMarks(); },
    loaded: function () { return cards.filter(function (c) { return c.loaded; }).length; },
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", build);
  else build();
})();
