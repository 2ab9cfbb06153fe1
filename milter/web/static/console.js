// Progressive enhancement only: every page works without this file.
// "Select all" for the quarantine table's checkboxes.
(function () {
  "use strict";
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-select-all]").forEach(function (box) {
      var name = box.getAttribute("data-select-all");
      var form = box.form;
      if (!form) { return; }
      var wrap = box.closest(".select-all-wrap");
      if (wrap) { wrap.hidden = false; }
      box.addEventListener("change", function () {
        form.querySelectorAll('input[type="checkbox"][name="' + name + '"]').forEach(function (item) {
          item.checked = box.checked;
        });
      });
    });
  });
})();
