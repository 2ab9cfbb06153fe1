// Progressive enhancement only: every page works without this file.
(function () {
  "use strict";
  document.addEventListener("DOMContentLoaded", function () {
    // Filters fold away on a phone (the list comes first); on a wider screen they start open.
    if (window.matchMedia && window.matchMedia("(min-width: 721px)").matches) {
      document.querySelectorAll("details[data-open-wide]").forEach(function (box) {
        box.open = true;
      });
    }
    // "Select all" for the quarantine table's checkboxes.
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
