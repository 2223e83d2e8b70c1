(function () {
  "use strict";
  function keyOf(row, column, numeric) {
    var cell = row.cells[column];
    var value = cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent;
    if (numeric) { return value === "" ? Infinity : parseFloat(value); }
    return value.toLowerCase();
  }
  function sortable(table) {
    var heads = table.tHead.rows[0].cells, body = table.tBodies[0], current = -1, ascending = true;
    function sortBy(column) {
      ascending = current === column ? !ascending : true;
      current = column;
      var numeric = heads[column].getAttribute("data-type") === "num";
      var keyed = Array.prototype.map.call(body.rows, function (row, i) { return [keyOf(row, column, numeric), i, row]; });
      keyed.sort(function (a, b) {
        var order = a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] - b[1];
        return ascending ? order : -order;
      });
      var fragment = document.createDocumentFragment();
      keyed.forEach(function (k) { fragment.appendChild(k[2]); });
      body.appendChild(fragment);
      Array.prototype.forEach.call(heads, function (h, j) {
        h.setAttribute("aria-sort", j === column ? (ascending ? "ascending" : "descending") : "none");
      });
    }
    Array.prototype.forEach.call(heads, function (head, column) {
      head.tabIndex = 0;
      head.title = "sort by this column";
      head.addEventListener("click", function () { sortBy(column); });
      head.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(column); }
      });
    });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), sortable);
  var files = document.getElementById("files"), knownOnly = document.getElementById("known-only"),
      filter = document.getElementById("filter");
  if (files && knownOnly && filter) {
    var apply = function () {
      var text = filter.value.toLowerCase(), onlyKnown = knownOnly.checked;
      Array.prototype.forEach.call(files.tBodies[0].rows, function (row) {
        row.hidden = (onlyKnown && !row.classList.contains("known")) ||
                     (text !== "" && row.cells[0].textContent.toLowerCase().indexOf(text) < 0);
      });
    };
    knownOnly.addEventListener("change", apply);
    filter.addEventListener("input", apply);
  }
})();
