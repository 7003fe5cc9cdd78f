// The review page: plain JS, no build step. POST the chosen image to match?correspondences=1, show the query
// beside its candidates (score: calibrated, higher = more likely a copy; is_copy: score >= threshold), and draw
// where in the query the selected candidate was found (the pair model's mutual nearest-neighbour tokens).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { image: null, found: null, selected: null };

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function showCollection() {
  try {
    const health = await (await fetch("health")).json();
    $("collection").textContent = `${health.references} references · copy threshold ${health.threshold.toFixed(3)}`;
  } catch (err) {
    $("collection").textContent = "the server does not answer";
  }
}

async function check(file) {
  if (!file) return;
  setStatus(`matching ${file.name}…`);
  $("result").hidden = true;
  const body = new FormData();
  body.append("image", file, file.name);
  body.append("k", $("k").value);
  body.append("correspondences", "1");
  let answer;
  try {
    const response = await fetch("match", { method: "POST", body });
    answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
  } catch (err) {
    setStatus(`refused: ${err.message}`, true);
    return;
  }
  const skipped = Object.entries(answer.skipped);
  if (skipped.length) { setStatus(`skipped: ${skipped[0][1]}`, true); return; }
  state.image = await loadImage(URL.createObjectURL(file));
  state.found = answer;
  $("query-name").textContent = file.name;
  showCandidates(answer);
  const copies = answer.matches.filter((m) => m.is_copy).length;
  setStatus(copies ? `${copies} candidate${copies > 1 ? "s" : ""} at or above the copy threshold`
                   : "no candidate reaches the copy threshold");
}

function loadImage(src) {
  return new Promise((resolve) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => resolve(null);  // a reference the collection keeps no pixels of: no thumbnail
    image.src = src;
  });
}

function showCandidates(answer) {
  const list = $("candidates");
  list.replaceChildren();
  answer.matches.forEach((match, n) => {
    const item = document.createElement("li");
    item.className = "candidate";
    item.dataset.reference = match.reference_id;
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = 224;
    item.append(canvas, text("div", "id", match.reference_id), scoreLine(match));
    item.addEventListener("click", () => select(n));
    list.append(item);
    loadImage(`references/${encodeURIComponent(match.reference_id)}/image`).then((image) => {
      item.thumbnail = image;
      drawCandidate(n);
    });
  });
  $("result").hidden = false;
  if (answer.matches.length) select(0); else drawQuery(null);
}

function text(tag, className, content) {
  const node = document.createElement(tag);
  node.className = className;
  node.textContent = content;
  return node;
}

function scoreLine(match) {
  const line = text("div", "score", `score ${match.score.toFixed(3)}`);
  line.append(text("span", `badge ${match.is_copy ? "copy" : "not"}`, match.is_copy ? "copy" : "not a copy"));
  return line;
}

function select(n) {
  state.selected = n;
  [...$("candidates").children].forEach((item, i) => item.classList.toggle("selected", i === n));
  drawQuery(state.found.matches[n]);
  [...$("candidates").children].forEach((_, i) => drawCandidate(i));
}

function correspondencesOf(match) {
  const perQuery = match && state.found.correspondences && state.found.correspondences[match.query_id];
  return perQuery ? { grid: perQuery.grid, found: perQuery.candidates[match.reference_id] } : null;
}

function drawQuery(match) {
  const canvas = $("query");
  const image = state.image;
  const scale = Math.min(1, 720 / Math.max(image.width, image.height));
  canvas.width = Math.round(image.width * scale);
  canvas.height = Math.round(image.height * scale);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  const c = correspondencesOf(match);
  if (!c || !c.found) {
    $("overlay-note").textContent = "no correspondences for this pair model";
    return;
  }
  const [gh, gw] = c.grid;
  const cw = canvas.width / gw, ch = canvas.height / gh;
  c.found.similarity.forEach((s, token) => {  // dim what the candidate does not contain
    ctx.fillStyle = `rgba(0, 0, 0, ${(0.65 * (1 - Math.max(0, Math.min(1, s)))).toFixed(3)})`;
    ctx.fillRect((token % gw) * cw, Math.floor(token / gw) * ch, cw, ch);
  });
  c.found.pairs.forEach((pair) => dot(ctx, pair[0] * canvas.width, pair[1] * canvas.height, pair, canvas.width));
  $("overlay-note").textContent = `${c.found.pairs.length} of ${gh * gw} parts found in ${match.reference_id}`;
}

function drawCandidate(n) {
  const item = $("candidates").children[n];
  if (!item) return;
  const canvas = item.querySelector("canvas");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  // the thumbnail keeps the reference's aspect: fit it in the square, centred; dots are fractions of it
  const t = item.thumbnail, side = canvas.width;
  const scale = t ? side / Math.max(t.width, t.height) : 1;
  const w = t ? t.width * scale : side, h = t ? t.height * scale : side;
  const x = (side - w) / 2, y = (canvas.height - h) / 2;
  if (t) ctx.drawImage(t, x, y, w, h);
  if (n !== state.selected) return;
  const c = correspondencesOf(state.found.matches[n]);
  if (c && c.found) c.found.pairs.forEach((pair) => dot(ctx, x + pair[2] * w, y + pair[3] * h, pair, side));
}

// A pair's colour is a function of where its token sits in the query (hue across, lightness down), and the
// same colour is drawn at its match in the candidate: a copy repeats the query's colour field, a look-alike
// scatters it.
function colourOf(pair) {
  return `hsl(${Math.round(300 * pair[0])}, 90%, ${Math.round(35 + 35 * pair[1])}%)`;
}

function dot(ctx, x, y, pair, width) {
  const r = Math.max(3, width / 70);
  ctx.beginPath();
  ctx.arc(x, y, r, 0, 2 * Math.PI);
  ctx.fillStyle = colourOf(pair);
  ctx.fill();
  ctx.lineWidth = Math.max(1, r / 3);
  ctx.strokeStyle = "#fff";
  ctx.stroke();
}

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => check(e.target.files[0]));
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
  drop.addEventListener("drop", (e) => check(e.dataTransfer.files[0]));
  $("k").addEventListener("change", () => check($("file").files[0]));
}

wire();
showCollection();
