// The drawing page of `mnist-cnn serve`. The server does all the image work: the drawing is
// sent as a PNG to /api/predict, which runs it through MNIST's normalisation (the same as
// `mnist-cnn predict`) and returns the 28x28 image the model saw, shown under the bars.
// A digit is sent small: cropped to its ink and drawn again from the strokes at most
// SEND_SIZE pixels on a side (MNIST fits a digit into 20x20, so ~4.6x that is plenty): at
// least ~8x fewer pixels for the server to decode than the whole 280x280 page.
// In "number" mode the canvas is twice as wide and the whole drawing goes to /api/read, which
// reads every digit left to right (`mnist-cnn predict --number`): the page draws a box
// around each digit it read (in the sent image's pixels) and shows each one's 28x28 image.
"use strict";
(() => {
  const EXPORT_SIZE = 280; // the drawing's page: black ink on a 280-pixel-high white page; brush widths are in its pixels
  const SEND_SIZE = 100; // digit mode: the PNG sent is at most this many pixels wide and high, margins included
  const SEND_MARGIN = 4; // digit mode: white pixels around the ink's box (the server reads the border as background)
  const ASPECT = { digit: 1, number: 2 }; // the canvas' width / height in each mode
  const LIVE_MS = 150; // at most one live prediction per this many ms while drawing
  const PROMPTS = {
    digit: "Draw a digit in the box, or upload an image.",
    number: "Write a number in the box (digits side by side), or upload an image.",
  };

  const $ = (id) => document.getElementById(id);
  const canvas = $("canvas");
  const context = canvas.getContext("2d");
  const result = document.querySelector(".result");
  const state = {
    mode: "digit",
    boxes: [], // in number mode: the digits read, [x0, y0, x1, y1] in the sent image's pixels
    boxesOf: null, // the size of the image the boxes are in: {width, height}
    strokes: [], // each {width, points: [[x, y], ...]} with x, y in [0, 1]
    current: null,
    picture: null, // an uploaded image shown on the canvas (drawing starts afresh)
    upload: null, // the uploaded file, re-sent when the model changes
    models: [],
    model: null,
    request: 0,
    controller: null,
    timer: null,
  };

  // ---- drawing -------------------------------------------------------------------------
  function fitCanvas() {
    const box = canvas.getBoundingClientRect();
    const width = Math.round(box.width * (window.devicePixelRatio || 1));
    const height = Math.round(width / ASPECT[state.mode]);
    if (width > 0 && (canvas.width !== width || canvas.height !== height)) {
      canvas.width = width;
      canvas.height = height;
    }
    render(context, canvas.width, canvas.height, true);
  }

  function drawStroke(ctx, stroke, width, height) {
    const points = stroke.points.map(([x, y]) => [x * width, y * height]);
    ctx.lineWidth = (stroke.width / EXPORT_SIZE) * height;
    if (points.length === 1) {
      ctx.beginPath();
      ctx.arc(points[0][0], points[0][1], ctx.lineWidth / 2, 0, 2 * Math.PI);
      ctx.fill();
      return;
    }
    // Quadratic curves through the midpoints of successive samples: smooth strokes from
    // jittery pointer positions, still passing close to every sample.
    ctx.beginPath();
    ctx.moveTo(points[0][0], points[0][1]);
    for (let i = 1; i < points.length - 1; i++) {
      const mx = (points[i][0] + points[i + 1][0]) / 2;
      const my = (points[i][1] + points[i + 1][1]) / 2;
      ctx.quadraticCurveTo(points[i][0], points[i][1], mx, my);
    }
    const last = points[points.length - 1];
    ctx.lineTo(last[0], last[1]);
    ctx.stroke();
  }

  // Where an image of `of` pixels lies on a canvas of width x height: fitted and centred
  // (an upload), or filling it (a drawing, sent at the canvas' own aspect).
  function placement(of, width, height) {
    const scale = Math.min(width / of.width, height / of.height);
    return { scale, left: (width - of.width * scale) / 2, top: (height - of.height * scale) / 2 };
  }

  function render(ctx, width, height, onScreen) {
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, width, height);
    if (onScreen && state.picture) {
      const p = state.picture;
      const at = placement(p, width, height);
      ctx.drawImage(p, at.left, at.top, p.width * at.scale, p.height * at.scale);
    }
    ctx.strokeStyle = ctx.fillStyle = "#000";
    ctx.lineCap = ctx.lineJoin = "round";
    for (const stroke of state.strokes) drawStroke(ctx, stroke, width, height);
    if (onScreen && state.boxes.length && state.boxesOf) {
      // the digits read, each framed (in number mode)
      const at = placement(state.boxesOf, width, height);
      ctx.save();
      ctx.strokeStyle = "#1a66d2";
      ctx.lineWidth = Math.max(1.5, height / 140);
      for (const [x0, y0, x1, y1] of state.boxes) {
        ctx.strokeRect(at.left + x0 * at.scale, at.top + y0 * at.scale, (x1 - x0) * at.scale, (y1 - y0) * at.scale);
      }
      ctx.restore();
    }
  }

  function pointOf(event) {
    const box = canvas.getBoundingClientRect();
    const clamp = (v) => Math.min(1, Math.max(0, v));
    return [clamp((event.clientX - box.left) / box.width), clamp((event.clientY - box.top) / box.height)];
  }

  canvas.addEventListener("pointerdown", (event) => {
    if (event.pointerType === "mouse" && event.button !== 0) return;
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    if (state.picture || state.upload) {
      state.picture = null;
      state.upload = null;
      $("source").textContent = "";
    }
    state.current = { width: Number($("brush").value), points: [pointOf(event)] };
    state.strokes.push(state.current);
    state.boxes = [];
    updateButtons();
    fitCanvas();
  });

  canvas.addEventListener("pointermove", (event) => {
    if (!state.current) return;
    event.preventDefault();
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
    for (const e of events.length ? events : [event]) state.current.points.push(pointOf(e));
    fitCanvas();
    predictSoon();
  });

  function endStroke() {
    if (!state.current) return;
    state.current = null;
    predictNow();
  }
  canvas.addEventListener("pointerup", endStroke);
  canvas.addEventListener("pointercancel", endStroke);
  canvas.addEventListener("lostpointercapture", endStroke);

  function undo() {
    if (state.current || !state.strokes.length) return;
    state.strokes.pop();
    fitCanvas();
    updateButtons();
    predictNow();
  }

  function clear() {
    state.strokes = [];
    state.current = null;
    state.picture = null;
    state.upload = null;
    state.boxes = [];
    $("source").textContent = "";
    fitCanvas();
    updateButtons();
    predictNow();
  }

  function updateButtons() {
    $("undo").disabled = state.strokes.length === 0;
  }

  $("undo").addEventListener("click", undo);
  $("clear").addEventListener("click", clear);
  $("brush").addEventListener("input", () => { $("brush-value").textContent = $("brush").value; });
  document.addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "z") {
      event.preventDefault();
      undo();
    } else if (document.activeElement === canvas && (event.key === "Delete" || event.key === "Escape")) {
      event.preventDefault();
      clear();
    }
  });

  // ---- predictions ---------------------------------------------------------------------
  function predictSoon() {
    if (state.timer === null) state.timer = setTimeout(predictNow, LIVE_MS);
  }

  function predictNow() {
    clearTimeout(state.timer);
    state.timer = null;
    if (state.upload) return send(state.upload, state.upload.name || "pasted image");
    if (!state.strokes.length) return showPrompt(PROMPTS[state.mode]); // a blank canvas is never a prediction
    result.dataset.pending = "true";
    // toBlob answers later: an answer to the drawing as it was must not land in between.
    state.request++;
    const page = state.mode === "digit" ? digitPage() : wholePage();
    page.toBlob((blob) => { if (blob) send(blob, null, { width: page.width, height: page.height }); }, "image/png");
  }

  // The whole drawing, EXPORT_SIZE pixels high (number mode: the boxes come back in its pixels).
  function wholePage() {
    const page = document.createElement("canvas");
    page.height = EXPORT_SIZE;
    page.width = EXPORT_SIZE * ASPECT[state.mode];
    render(page.getContext("2d"), page.width, page.height, false);
    return page;
  }

  // A digit as the server needs it: the ink's box on the EXPORT_SIZE page (strokes plus half
  // the brush, clipped to the page), scaled down so its longer side fits SEND_SIZE less the
  // margins (never up), with SEND_MARGIN white pixels around it. Drawn again from the strokes
  // rather than resampled from the page: the canvas' antialiasing averages each pixel's
  // coverage, as an area downscale would.
  function digitPage() {
    let x0 = EXPORT_SIZE, y0 = EXPORT_SIZE, x1 = 0, y1 = 0;
    for (const stroke of state.strokes) {
      const r = stroke.width / 2;
      for (const [x, y] of stroke.points) {
        x0 = Math.min(x0, x * EXPORT_SIZE - r);
        y0 = Math.min(y0, y * EXPORT_SIZE - r);
        x1 = Math.max(x1, x * EXPORT_SIZE + r);
        y1 = Math.max(y1, y * EXPORT_SIZE + r);
      }
    }
    [x0, y0, x1, y1] = [Math.max(0, x0), Math.max(0, y0), Math.min(EXPORT_SIZE, x1), Math.min(EXPORT_SIZE, y1)];
    const scale = Math.min(1, (SEND_SIZE - 2 * SEND_MARGIN) / Math.max(x1 - x0, y1 - y0));
    const side = (extent) => Math.min(SEND_SIZE, Math.ceil(extent * scale) + 2 * SEND_MARGIN);
    const page = document.createElement("canvas");
    page.width = side(x1 - x0);
    page.height = side(y1 - y0);
    const ctx = page.getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, page.width, page.height);
    ctx.setTransform(scale, 0, 0, scale, SEND_MARGIN - x0 * scale, SEND_MARGIN - y0 * scale);
    ctx.beginPath();
    ctx.rect(0, 0, EXPORT_SIZE, EXPORT_SIZE); // ink past the page's edge is cut, as on the page
    ctx.clip();
    render(ctx, EXPORT_SIZE, EXPORT_SIZE, false);
    return page;
  }

  async function send(blob, name, size) {
    const id = ++state.request;
    const mode = state.mode;
    if (state.controller) state.controller.abort();
    state.controller = new AbortController();
    result.dataset.pending = "true";
    // A drawing goes as a raw image/png body (the blob's type; nothing for the server to
    // parse around it), a file as the multipart field `file`, with its name, whatever its type.
    let payload = blob;
    if (name) {
      payload = new FormData();
      payload.append("file", blob, name);
    }
    const query = new URLSearchParams({ preprocessed: "1" });
    if (state.model) query.set("model", state.model);
    let reply, body;
    try {
      const route = mode === "number" ? "api/read" : "api/predict";
      reply = await fetch(`${route}?${query}`, { method: "POST", body: payload, signal: state.controller.signal });
      body = await reply.json();
    } catch (error) {
      if (id !== state.request) return; // superseded by a newer request
      return showError(error.name === "AbortError" ? "cancelled" : "the server did not answer");
    }
    if (id !== state.request) return;
    if (reply.ok && mode === "number") showNumber(body, name, size || state.picture);
    else if (reply.ok) showResult(body, name);
    else if (reply.status === 422 && /no digit found/.test(body.error || "")) showPrompt("No digit found: draw a bigger or darker one.");
    else showError(body.error || `error ${reply.status}`);
  }

  function classesOf(name) {
    const model = state.models.find((m) => m.name === name);
    return model ? model.classes : null;
  }

  function showResult(body, name) {
    const classes = classesOf(body.model) || body.probabilities.map((_, i) => String(i));
    // Below the model's calibrated threshold the answer is "unsure", as `mnist-cnn predict`
    // says: maybe not a digit at all, so no big digit is shown, only the best guess.
    $("label").textContent = body.unsure ? "not a digit?" : body.name;
    $("label").classList.toggle("unsure", Boolean(body.unsure));
    $("probability").textContent = body.unsure
      ? `unsure: best guess ${body.name} (${(100 * body.probability).toFixed(1)}%)`
      : `${(100 * body.probability).toFixed(1)}%`;
    const bars = $("bars");
    if (bars.children.length !== classes.length || bars.dataset.model !== body.model) {
      bars.replaceChildren(...classes.map((cls) => {
        const item = document.createElement("li");
        item.innerHTML = '<span class="name"></span><span class="track"><span class="fill"></span></span><span class="value"></span>';
        item.querySelector(".name").textContent = cls;
        item.title = cls;
        return item;
      }));
      bars.dataset.model = body.model;
    }
    body.probabilities.forEach((p, i) => {
      const item = bars.children[i];
      item.classList.toggle("best", i === body.label);
      item.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
      item.querySelector(".value").textContent = `${(100 * p).toFixed(1)}%`;
      item.setAttribute("aria-label", `${classes[i]}: ${(100 * p).toFixed(1)} percent`);
    });
    $("preview").src = `data:image/png;base64,${body.preprocessed}`;
    $("source").textContent = name ? `from ${name}` : "";
    $("prompt").hidden = true;
    $("error").hidden = true;
    $("number-answer").hidden = true;
    $("answer").hidden = false;
    result.dataset.pending = "false";
  }

  function showNumber(body, name, size) {
    $("number").textContent = body.text;
    $("digits").replaceChildren(...body.digits.map((digit) => {
      const item = document.createElement("li");
      item.innerHTML = '<img alt="" width="56" height="56"><span class="name"></span><span class="value"></span>';
      item.classList.toggle("unsure", digit.unsure);
      item.querySelector("img").src = `data:image/png;base64,${digit.preprocessed}`;
      item.querySelector("img").alt = `the 28×28 image the model saw for ${digit.unsure ? "an unsure" : "the"} ${digit.name}`;
      item.querySelector(".name").textContent = digit.unsure ? `${digit.name}?` : digit.name;
      item.querySelector(".value").textContent = `${(100 * digit.probability).toFixed(1)}%`;
      return item;
    }));
    state.boxes = body.digits.map((digit) => digit.box);
    state.boxesOf = size ? { width: size.width, height: size.height } : null;
    fitCanvas();
    $("source").textContent = name ? `from ${name}` : "";
    $("prompt").hidden = true;
    $("error").hidden = true;
    $("answer").hidden = true;
    $("number-answer").hidden = false;
    result.dataset.pending = "false";
  }

  function showPrompt(message) {
    state.request++;
    if (state.controller) state.controller.abort();
    $("prompt").textContent = message;
    $("prompt").hidden = false;
    $("answer").hidden = true;
    $("number-answer").hidden = true;
    $("error").hidden = true;
    state.boxes = [];
    result.dataset.pending = "false";
  }

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = false;
    $("answer").hidden = true;
    $("number-answer").hidden = true;
    $("prompt").hidden = true;
    result.dataset.pending = "false";
  }

  // ---- modes: one digit, or a number ----------------------------------------------------
  function setMode(mode) {
    if (mode === state.mode) return;
    state.mode = mode;
    document.body.classList.toggle("number-mode", mode === "number");
    $("mode-digit").setAttribute("aria-pressed", String(mode === "digit"));
    $("mode-number").setAttribute("aria-pressed", String(mode === "number"));
    $("h1-title").textContent = mode === "number" ? "Write a number" : "Draw a digit";
    if (!state.digitHint) state.digitHint = $("hint").textContent;
    $("hint").textContent = mode === "number"
      ? "Write the digits side by side, or drop, paste or upload an image. Each digit read is boxed, "
        + "and shown below as the 28×28 image the model saw."
      : state.digitHint;
    clear(); // strokes drawn for one shape of canvas would be stretched on the other
  }
  $("mode-digit").addEventListener("click", () => setMode("digit"));
  $("mode-number").addEventListener("click", () => setMode("number"));

  // ---- images from files: upload button, drag and drop, paste ----------------------------
  async function useFile(file) {
    if (!file) return;
    state.strokes = [];
    state.boxes = [];
    state.upload = file;
    try {
      state.picture = await createImageBitmap(file);
    } catch (error) {
      state.picture = null; // a format the browser cannot show; the server may still read it
    }
    fitCanvas();
    updateButtons();
    predictNow();
  }

  $("upload").addEventListener("change", (event) => {
    useFile(event.target.files[0]);
    event.target.value = "";
  });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
    $("drop-hint").hidden = false;
  });
  zone.addEventListener("dragleave", () => {
    zone.classList.remove("dragging");
    $("drop-hint").hidden = true;
  });
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    $("drop-hint").hidden = true;
    useFile(event.dataTransfer.files[0]);
  });
  // A file dropped beside the canvas must not make the browser leave the page.
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => event.preventDefault());
  document.addEventListener("paste", (event) => {
    const item = [...(event.clipboardData || { items: [] }).items].find((i) => i.kind === "file" && i.type.startsWith("image/"));
    if (item) {
      event.preventDefault();
      useFile(item.getAsFile());
    }
  });

  // ---- models --------------------------------------------------------------------------
  async function loadModels() {
    try {
      const body = await (await fetch("api/models")).json();
      state.models = body.models || [];
      state.model = body.default || null;
    } catch (error) {
      return;
    }
    const select = $("model");
    select.replaceChildren(...state.models.map((m) => {
      const option = document.createElement("option");
      option.value = m.name;
      const accuracy = m.test_accuracy == null ? "" : `, ${(100 * m.test_accuracy).toFixed(2)}%`;
      option.textContent = `${m.name} (${m.dataset || "?"}${accuracy})`;
      return option;
    }));
    select.value = state.model;
    $("model-choice").hidden = state.models.length < 2;
  }
  $("model").addEventListener("change", (event) => {
    state.model = event.target.value;
    predictNow();
  });

  if (window.ResizeObserver) new ResizeObserver(fitCanvas).observe(canvas);
  window.addEventListener("resize", fitCanvas);
  fitCanvas();
  updateButtons();
  result.dataset.pending = "false";
  loadModels().then(() => document.body.dataset.ready = "true");
})();
