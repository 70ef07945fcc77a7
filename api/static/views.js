/* channelgraph views: draws the graphs the server laid out (physics off), and makes the
 * tables sortable, filterable and clickable. Reads its data from <script id="cg-data">.
 * Exposes window.cg = {data, networks: {name: {network, nodes, edges}}, ready} for tests. */
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("cg-data").textContent);
  var cg = (window.cg = { data: data, networks: {}, ready: false });

  function nodeOptions(node) {
    var style = data.styles[node.kind] || data.styles.unknown;
    var out = {
      id: node.id, label: node.label, title: node.title, x: node.x, y: node.y, shape: style.shape,
      color: { background: style.color, border: node.crossed ? data.crossed : shade(style.color),
               highlight: { background: style.color, border: "#111" }, hover: { background: style.color, border: "#111" } },
      font: { color: style.font || "#1b2631", size: 14, face: "system-ui, sans-serif" },
      borderWidth: node.crossed || node.root ? 3 : 1, size: 14,
    };
    if (node.root) { out.size = 22; out.font.size = 16; out.font.bold = true; }
    if (node.value) { out.size = Math.min(40, 10 + 3 * Math.sqrt(node.value)); }
    return out;
  }

  function edgeOptions(edge) {
    var red = Boolean(edge.crossed);
    return {
      id: edge.id, from: edge.from, to: edge.to, label: edge.label, title: edge.title,
      width: edge.width || 1.5, dashes: Boolean(edge.dashes), arrows: { to: { enabled: true, scaleFactor: 0.6 } },
      color: { color: red ? data.crossed : "#7f8c8d", highlight: red ? "#a93226" : "#34495e", hover: red ? "#a93226" : "#34495e" },
      font: { size: 12, color: red ? "#a93226" : "#34495e", strokeWidth: 3, strokeColor: "#ffffff", align: "top" },
    };
  }

  function shade(hex) {
    var n = parseInt(hex.slice(1), 16), f = 0.7;
    var r = Math.round(((n >> 16) & 255) * f), g = Math.round(((n >> 8) & 255) * f), b = Math.round((n & 255) * f);
    return "#" + ((1 << 24) | (r << 16) | (g << 8) | b).toString(16).slice(1);
  }

  /* Draw `graph` ({nodes, edges, stats, big}) into the element with data-graph=name. */
  function draw(name, graph) {
    var element = document.querySelector('[data-graph="' + name + '"]');
    if (!element) return null;
    if (cg.networks[name]) { cg.networks[name].network.destroy(); delete cg.networks[name]; }
    element.textContent = "";
    if (!graph || !graph.nodes.length) {
      element.classList.add("empty");
      element.textContent = "nothing to draw";
      return null;
    }
    element.classList.remove("empty");
    var nodes = new vis.DataSet(graph.nodes.map(nodeOptions));
    var edges = new vis.DataSet(graph.edges.map(edgeOptions));
    var network = new vis.Network(element, { nodes: nodes, edges: edges }, {
      physics: false,
      layout: { improvedLayout: false },
      edges: { smooth: graph.big ? false : { type: "cubicBezier", forceDirection: "horizontal", roundness: 0.35 } },
      interaction: { hover: true, tooltipDelay: 120, hideEdgesOnDrag: graph.big, navigationButtons: false, keyboard: false },
    });
    network.once("afterDrawing", function () {
      network.fit({ animation: false });
      if (network.getScale() > 1.3) network.moveTo({ scale: 1.3 });  // a short path stays life-size
    });
    cg.networks[name] = { network: network, nodes: nodes, edges: edges, stats: graph.stats };
    var caption = element.parentNode.querySelector('[data-caption="' + name + '"]');
    if (caption && graph.stats) {
      var s = graph.stats;
      caption.textContent = s.nodes + " nodes, " + s.edges + " edges drawn" +
        (s.nodes < s.nodes_total || s.edges < s.edges_total ? " (of " + s.nodes_total + " and " + s.edges_total + ")" : "");
    }
    return network;
  }
  cg.draw = draw;

  /* Detail panels: a finding's path (diversions) or a user's cascade (super users). */
  function select(key) {
    var graphs = data.view === "diversions" ? data.paths : data.cascades;
    if (!graphs) return;
    if (!graphs[key]) {
      if (data.view === "influencers" && location.protocol !== "file:") {
        var params = new URLSearchParams(location.search);
        params.set("user", key);
        location.search = params.toString();
      } else {
        var title = document.getElementById("detail-title");
        if (title) title.textContent = "Not in this exported file: " + key;
      }
      return;
    }
    document.querySelectorAll("table.clickable tr.selected").forEach(function (tr) { tr.classList.remove("selected"); });
    var row = document.querySelector('table.clickable tr[data-key="' + CSS.escape(key) + '"]');
    if (row) row.classList.add("selected");
    var heading = document.getElementById("detail-title");
    if (heading) heading.textContent = (data.view === "diversions" ? "Path of " : "Cascade of ") + key;
    cg.selected = key;
    draw("detail", graphs[key]);
  }
  cg.select = select;

  function cellValue(row, index) {
    var cell = row.children[index];
    return cell ? cell.textContent.trim() : "";
  }

  function makeSortable(table) {
    var headers = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(headers, function (th, index) {
      th.title = "sort by " + th.textContent;
      th.addEventListener("click", function () {
        var ascending = th.getAttribute("aria-sort") !== "ascending";
        Array.prototype.forEach.call(headers, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        var body = table.tBodies[0];
        var rows = Array.prototype.filter.call(body.rows, function (r) { return r.hasAttribute("data-key"); });
        var numeric = th.dataset.type === "num";
        rows.sort(function (a, b) {
          var x = cellValue(a, index), y = cellValue(b, index);
          var order = numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
          return ascending ? order : -order;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  }

  function makeFilterable(table) {
    var inputs = table.tHead.querySelectorAll("tr.filters input");
    function apply() {
      var wanted = Array.prototype.map.call(inputs, function (i) { return i.value.trim().toLowerCase(); });
      Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
        if (!row.hasAttribute("data-key")) return;
        var show = wanted.every(function (w, i) { return !w || cellValue(row, i).toLowerCase().indexOf(w) >= 0; });
        row.hidden = !show;
      });
    }
    inputs.forEach(function (input) { input.addEventListener("input", apply); });
  }

  document.querySelectorAll("table.sortable").forEach(makeSortable);
  document.querySelectorAll("table.filterable").forEach(makeFilterable);
  document.querySelectorAll("table.clickable tbody").forEach(function (body) {
    body.addEventListener("click", function (event) {
      var row = event.target.closest("tr[data-key]");
      if (row) select(row.getAttribute("data-key"));
    });
  });

  Object.keys(data.graphs || {}).forEach(function (name) { draw(name, data.graphs[name]); });
  if (data.selected) select(data.selected);
  cg.ready = true;
})();
