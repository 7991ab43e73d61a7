// The VM tables' filter box and sortable columns. htmx replaces the tables every few seconds, so the
// filter and the sort are kept here and applied again after every swap.
(function () {
  let sortColumn = null, sortDescending = false;

  function cellValue(row, column) {
    const cell = row.cells[column];
    if (!cell) return "";
    const key = cell.dataset.sort ?? cell.textContent.trim();
    const number = Number(key);
    return key !== "" && !Number.isNaN(number) ? number : key.toLowerCase();
  }

  function apply() {
    const filter = (document.getElementById("vm-filter")?.value || "").toLowerCase();
    document.querySelectorAll("table.sortable").forEach((table) => {
      const body = table.tBodies[0];
      const rows = Array.from(body.rows).filter((row) => !row.classList.contains("empty"));
      if (sortColumn !== null) {
        rows.sort((a, b) => {
          const x = cellValue(a, sortColumn), y = cellValue(b, sortColumn);
          return (x < y ? -1 : x > y ? 1 : 0) * (sortDescending ? -1 : 1);
        });
        rows.forEach((row) => body.appendChild(row));
      }
      rows.forEach((row) => { row.hidden = filter !== "" && !row.textContent.toLowerCase().includes(filter); });
      Array.from(table.tHead.rows[0].cells).forEach((th, index) => {
        th.setAttribute("aria-sort", index === sortColumn ? (sortDescending ? "descending" : "ascending") : "none");
      });
    });
  }

  document.addEventListener("click", (event) => {
    const th = event.target.closest("table.sortable th");
    if (!th) return;
    sortDescending = sortColumn === th.cellIndex ? !sortDescending : false;
    sortColumn = th.cellIndex;
    apply();
  });
  document.addEventListener("input", (event) => { if (event.target.id === "vm-filter") apply(); });
  document.addEventListener("htmx:afterSwap", apply);
})();
