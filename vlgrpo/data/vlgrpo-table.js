/* Offline stand-in for bootstrap-table in Great Expectations Data Docs (vlgrpo/data/docs_offline.py).
   GE's pages call $(table).bootstrapTable({columns, data, rowAttributes, ...}) to build their index tables in
   the browser; this renders the same header and rows (cells are GE's own HTML) and keeps the row links.
   Method calls such as bootstrapTable('resetSearch') are accepted and do nothing: there is no search box. */
(function ($) {
  "use strict";
  function option(value) {
    // GE passes callbacks by name ('rowAttributesLinks'): look them up on window.
    return typeof value === "string" ? window[value] : value;
  }
  $.fn.bootstrapTable = function (opts) {
    if (typeof opts !== "object" || opts === null) { return this; }
    var columns = opts.columns || [], data = opts.data || [];
    var rowAttributes = option(opts.rowAttributes), rowStyle = option(opts.rowStyle);
    return this.each(function () {
      var $table = $(this).addClass("table table-hover table-sm").empty();
      var $head = $("<tr>");
      columns.forEach(function (c) { $head.append($("<th>").text(c.title || c.field)); });
      $table.append($("<thead>").append($head));
      var $body = $("<tbody>");
      data.forEach(function (row, i) {
        var $tr = $("<tr>");
        if (typeof rowAttributes === "function") { $tr.attr(rowAttributes(row, i)); }
        if (typeof rowStyle === "function") { $tr.css((rowStyle(row, i) || {}).css || {}); }
        columns.forEach(function (c) { $tr.append($("<td>").html(row[c.field] === undefined ? "" : row[c.field])); });
        if ($tr.data("href")) {
          $tr.on("click", function (e) {
            if (!$(e.target).closest("a").length) { window.location = $tr.data("href"); }
          });
        }
        $body.append($tr);
      });
      $table.append($body);
    });
  };
})(window.jQuery);
