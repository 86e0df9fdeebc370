"""The HTML report (html, templates/) and its figures (plots)."""
