// NeuronPicker front end: the image, the activation heatmap over it, and the selected cells.
// Python owns the selection: the canvas only sends what the user did and redraws from `mask`.

const RAMP = [[20, 10, 60], [140, 30, 110], [240, 110, 40], [252, 240, 160]];

function colour(value) {
  const position = Math.min(Math.max(value, 0), 1) * (RAMP.length - 1);
  const low = Math.min(Math.floor(position), RAMP.length - 2);
  const fraction = position - low;
  return RAMP[low].map((c, i) => Math.round(c * (1 - fraction) + RAMP[low + 1][i] * fraction));
}

function render({ model, el }) {
  el.classList.add("invviz-picker");
  const canvas = document.createElement("canvas");
  canvas.className = "invviz-picker-canvas";
  el.appendChild(canvas);
  const context = canvas.getContext("2d");
  let photo = null;
  let drag = null; // {r0, c0, r1, c1, shift} while the pointer is down
  let generation = 0;

  const grid = () => {
    const activation = model.get("activation");
    return [activation.length, activation.length ? activation[0].length : 0];
  };

  function cellAt(event) {
    const [rows, cols] = grid();
    const box = canvas.getBoundingClientRect();
    const x = (event.clientX - box.left) / box.width;
    const y = (event.clientY - box.top) / box.height;
    const clamp = (v, n) => Math.min(Math.max(Math.floor(v * n), 0), n - 1);
    return [clamp(y, rows), clamp(x, cols)];
  }

  function draw() {
    const width = model.get("display_size");
    const height = photo ? Math.round((width * photo.height) / photo.width) : width;
    const scale = window.devicePixelRatio || 1;
    canvas.width = Math.round(width * scale);
    canvas.height = Math.round(height * scale);
    canvas.style.width = `${width}px`;
    canvas.style.height = `${height}px`;
    context.setTransform(scale, 0, 0, scale, 0, 0);
    context.fillStyle = "#eee";
    context.fillRect(0, 0, width, height);
    if (photo) context.drawImage(photo, 0, 0, width, height);
    const [rows, cols] = grid();
    if (!rows || !cols) return;
    const activation = model.get("activation");
    const mask = model.get("mask");
    const cellW = width / cols;
    const cellH = height / rows;
    const opacity = model.get("opacity");
    for (let r = 0; r < rows; r++) {
      for (let c = 0; c < cols; c++) {
        const [red, green, blue] = colour(activation[r][c]);
        context.fillStyle = `rgba(${red},${green},${blue},${opacity})`;
        context.fillRect(c * cellW, r * cellH, cellW + 0.5, cellH + 0.5);
      }
    }
    context.lineWidth = 2;
    context.strokeStyle = "#00e5ff";
    context.fillStyle = "rgba(0, 229, 255, 0.25)";
    for (let r = 0; r < rows; r++) {
      for (let c = 0; c < cols; c++) {
        if (mask[r] && mask[r][c]) {
          context.fillRect(c * cellW, r * cellH, cellW, cellH);
          context.strokeRect(c * cellW + 1, r * cellH + 1, cellW - 2, cellH - 2);
        }
      }
    }
    if (drag) {
      const top = Math.min(drag.r0, drag.r1);
      const left = Math.min(drag.c0, drag.c1);
      context.setLineDash([4, 3]);
      context.strokeStyle = "white";
      context.strokeRect(
        left * cellW, top * cellH,
        (Math.abs(drag.c1 - drag.c0) + 1) * cellW, (Math.abs(drag.r1 - drag.r0) + 1) * cellH,
      );
      context.setLineDash([]);
    }
  }

  async function loadPhoto() {
    const mine = ++generation; // a newer image may arrive while this one decodes
    const bytes = model.get("image");
    let decoded = null;
    if (bytes && bytes.byteLength) {
      decoded = await createImageBitmap(new Blob([bytes], { type: "image/png" }));
    }
    if (mine === generation) {
      photo = decoded;
      draw();
    }
  }

  function onDown(event) {
    const [rows, cols] = grid();
    if (!rows || !cols) return;
    const [r, c] = cellAt(event);
    drag = { r0: r, c0: c, r1: r, c1: c, shift: event.shiftKey };
    canvas.setPointerCapture(event.pointerId);
    draw();
  }

  function onMove(event) {
    if (!drag) return;
    [drag.r1, drag.c1] = cellAt(event);
    draw();
  }

  function onUp() {
    if (!drag) return;
    const single = drag.r0 === drag.r1 && drag.c0 === drag.c1;
    const mode = drag.shift ? "add" : single ? "toggle" : "replace";
    model.send({
      kind: "select",
      rows: [Math.min(drag.r0, drag.r1), Math.max(drag.r0, drag.r1) + 1],
      cols: [Math.min(drag.c0, drag.c1), Math.max(drag.c0, drag.c1) + 1],
      mode,
    });
    drag = null;
    draw();
  }

  canvas.addEventListener("pointerdown", onDown);
  canvas.addEventListener("pointermove", onMove);
  canvas.addEventListener("pointerup", onUp);
  canvas.addEventListener("pointercancel", () => { drag = null; draw(); });
  model.on("change:image", loadPhoto);
  model.on("change:activation change:mask change:opacity change:display_size", draw);
  loadPhoto();
  return () => {
    model.off("change:image", loadPhoto);
    model.off("change:activation change:mask change:opacity change:display_size", draw);
  };
}

export default { render };
