// TileGrid front end: a grid of PNG tiles with captions; a click selects a tile (or unselects it).

function render({ model, el }) {
  el.classList.add("invviz-tiles");
  let urls = [];

  function draw() {
    urls.forEach((url) => URL.revokeObjectURL(url));
    urls = [];
    el.replaceChildren();
    el.style.gridTemplateColumns = `repeat(${model.get("columns")}, ${model.get("tile_size")}px)`;
    const labels = model.get("labels");
    model.get("tiles").forEach((bytes, index) => {
      const cell = document.createElement("figure");
      cell.className = "invviz-tile";
      if (index === model.get("selected")) cell.classList.add("invviz-tile-selected");
      if (bytes && bytes.byteLength) {
        const image = document.createElement("img");
        const url = URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
        urls.push(url);
        image.src = url;
        cell.appendChild(image);
      } else {
        const waiting = document.createElement("div");
        waiting.className = "invviz-tile-waiting";
        cell.appendChild(waiting);
      }
      const caption = document.createElement("figcaption");
      caption.textContent = labels[index] ?? "";
      cell.appendChild(caption);
      cell.addEventListener("click", () => {
        model.set("selected", model.get("selected") === index ? -1 : index);
        model.save_changes();
      });
      el.appendChild(cell);
    });
  }

  model.on("change:tiles change:labels change:selected change:columns change:tile_size", draw);
  draw();
  return () => {
    model.off("change:tiles change:labels change:selected change:columns change:tile_size", draw);
    urls.forEach((url) => URL.revokeObjectURL(url));
  };
}

export default { render };
