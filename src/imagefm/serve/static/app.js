// imagefm web page: text or image search over the index, and a zero-shot panel.
// Plain JS, no build step. Everything the server sends is inserted with textContent, never as
// HTML: file names are user data.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { image: null, objectUrls: [] };  // image: data URL picked for zero-shot

function apiKey() { return sessionStorage.getItem("imagefm-key") || ""; }

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (apiKey()) h["Authorization"] = "Bearer " + apiKey();
  return h;
}

function setStatus(text, isError) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", Boolean(isError));
}

async function api(path, body) {
  const response = await fetch(path, body === undefined
    ? { headers: headers(false) }
    : { method: "POST", headers: headers(true), body: JSON.stringify(body) });
  if (response.status === 401) $("key-box").hidden = false;
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = (data.error && data.error.message) || response.statusText;
    throw new Error(message);
  }
  return data;
}

async function loadInfo() {
  try {
    const health = await api("/healthz");
    if (health.auth) $("key-box").hidden = false;
    const index = health.index ? `${health.index.images} images (${health.index.kind})`
                               : "no index: zero-shot only";
    $("info").textContent = `model ${health.model} · ${index}`;
    document.body.dataset.ready = "true";
  } catch (err) {
    $("info").textContent = "server unreachable";
  }
}

function clearResults() {
  state.objectUrls.forEach((url) => URL.revokeObjectURL(url));
  state.objectUrls = [];
  $("results").replaceChildren();
}

async function thumbnail(img, url) {
  // fetch + blob instead of <img src>: the request can then carry the API key header.
  try {
    const response = await fetch(url, { headers: headers(false) });
    if (!response.ok) return;
    const blobUrl = URL.createObjectURL(await response.blob());
    state.objectUrls.push(blobUrl);
    img.src = blobUrl;
  } catch (err) { /* a missing thumbnail leaves an empty tile */ }
}

function showResults(data) {
  clearResults();
  if (!data.results.length) { setStatus("No results."); return; }
  for (const hit of data.results) {
    const card = document.createElement("figure");
    card.className = "result";
    card.dataset.id = hit.id;
    const img = document.createElement("img");
    img.alt = hit.path;
    img.loading = "lazy";
    const caption = document.createElement("figcaption");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    const name = document.createElement("span");
    name.className = "path";
    name.textContent = hit.path;
    caption.append(score, name);
    card.append(img, caption);
    card.addEventListener("click", () => pickResult(card, hit));
    $("results").append(card);
    thumbnail(img, hit.thumbnail_url);
  }
  setStatus(`${data.results.length} results for a ${data.query_type} query ` +
            `(${data.took_ms.toFixed(1)} ms)`);
}

async function search(body) {
  setStatus("Searching…");
  try {
    showResults(await api("/v1/search", { ...body, k: Number($("k").value) }));
  } catch (err) {
    clearResults();
    setStatus(err.message, true);
  }
}

function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

function useImage(dataUrl) {
  state.image = dataUrl;
  $("preview").src = dataUrl;
  $("preview").hidden = false;
  $("classify").disabled = false;
}

async function pickFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) { setStatus(`${file.name} is not an image`, true); return; }
  const dataUrl = await readAsDataUrl(file);
  useImage(dataUrl);
  search({ image: dataUrl });
}

async function pickResult(card, hit) {
  document.querySelectorAll(".result.selected").forEach((c) => c.classList.remove("selected"));
  card.classList.add("selected");
  try {
    const response = await fetch(hit.image_url, { headers: headers(false) });
    if (!response.ok) throw new Error(`cannot load ${hit.path}`);
    useImage(await readAsDataUrl(await response.blob()));
    setStatus(`Selected ${hit.path} for zero-shot.`);
  } catch (err) { setStatus(err.message, true); }
}

function showBars(data) {
  const bars = $("bars");
  bars.replaceChildren();
  for (const item of data.labels) {
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = `${(item.probability * 100).toFixed(1)}%`;
    const text = document.createElement("div");
    text.className = "text";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = item.label;
    const value = document.createElement("span");
    value.textContent = `${(item.probability * 100).toFixed(1)}%`;
    text.append(label, value);
    bar.append(fill, text);
    bars.append(bar);
  }
}

async function classify() {
  const labels = $("labels").value.split(/[,\n]/).map((s) => s.trim()).filter(Boolean);
  if (!state.image || !labels.length) { setStatus("Pick an image and give labels.", true); return; }
  setStatus("Classifying…");
  try {
    showBars(await api("/v1/classify", { image: state.image, labels, lang: $("lang").value }));
    setStatus("Classified.");
  } catch (err) { setStatus(err.message, true); }
}

function setup() {
  $("api-key").value = apiKey();
  $("api-key").addEventListener("change", (e) => {
    sessionStorage.setItem("imagefm-key", e.target.value.trim());
    loadInfo();
  });
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const query = $("query").value.trim();
    if (query) search({ query });
  });
  $("file").addEventListener("change", (e) => pickFile(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    pickFile(e.dataTransfer.files[0]);
  });
  $("classify").addEventListener("click", classify);
  loadInfo();
}

document.addEventListener("DOMContentLoaded", setup);
