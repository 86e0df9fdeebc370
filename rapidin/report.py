"""The self-contained HTML report: run settings, metrics, and per query its top helpful and harmful samples.

Rendered with Jinja2 with autoescaping on, so any HTML in user data is shown as text. No network access is
needed to open it (inline CSS, no scripts from elsewhere).
"""

from __future__ import annotations

import json

import jinja2

from rapidin.store import atomic_file

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rapidin report: {{ settings.get('name', '') }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ccc; padding: .25em .5em; }
th { background: #f3f3f3; text-align: left; } .score { font-family: monospace; text-align: right; }
.text { white-space: pre-wrap; } .poisoned { background: #ffe3e3; } section.query { border-top: 2px solid #888; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
</style></head><body>
<h1>Influential training samples: {{ settings.get('name', '') }}</h1>
<h2>Settings</h2>
<table id="settings">{% for key, value in settings.items() %}<tr><th>{{ key }}</th><td>{{ value }}</td></tr>{% endfor %}</table>
{% if metrics %}<h2>Metrics</h2>
<table id="metrics">
{% if metrics.get('auprc') %}<tr><th>k</th>{% for k in metrics.auprc %}<th>{{ k }}</th>{% endfor %}</tr>
<tr><th>auPRC</th>{% for v in metrics.auprc.values() %}<td class="score">{{ '%.4f' % v }}</td>{% endfor %}</tr>
<tr><th>auROC</th>{% for v in metrics.auroc.values() %}<td class="score">{{ '%.4f' % v }}</td>{% endfor %}</tr>{% endif %}
{% for key, value in metrics.items() if key not in ('auprc', 'auroc') %}<tr><th>{{ key }}</th><td colspan="6">{{ value }}</td></tr>{% endfor %}
</table>{% endif %}
<h2>Queries</h2>
<ol>{% for q in queries %}<li><a href="#q{{ q.query.index }}">{{ q.query.instruction | truncate(90) }}</a></li>{% endfor %}</ol>
{% for q in queries %}<section class="query" id="q{{ q.query.index }}">
<h3>Query {{ q.query.index }} (id {{ q.query.id }}){% if q.query.attacked %}, attacked{% endif %}</h3>
<p><b>Instruction:</b> <span class="text">{{ q.query.instruction }}</span></p>
{% if q.query.input %}<p><b>Input:</b> <span class="text">{{ q.query.input }}</span></p>{% endif %}
<p><b>Response:</b> <span class="text">{{ q.query.output }}</span></p>
<div class="pair">{% for title, rows in (('Most helpful', q.helpful), ('Most harmful', q.harmful)) %}
<div><h4>{{ title }}</h4><table><tr><th>#</th><th>score</th><th>id</th><th>sample</th></tr>
{% for s in rows[:top_n] %}<tr{% if s.poisoned %} class="poisoned"{% endif %}><td>{{ s.rank }}</td>
<td class="score">{{ '%.4g' % s.score }}</td><td>{{ s.id }}</td>
<td class="text">{{ s.instruction }}{% if s.input %} | {{ s.input }}{% endif %} → {{ s.output }}</td></tr>{% endfor %}
</table></div>{% endfor %}</div>
</section>{% endfor %}
</body></html>
"""


def write_report(
    topk: str, out: str, metrics: str | None = None, settings: dict | None = None, top_n: int = 10
) -> None:
    """Render topk.jsonl (plus optional metrics.json and the run's settings) into one HTML file."""
    with open(topk, encoding="utf-8") as handle:
        queries = [json.loads(line) for line in handle]
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.ChainableUndefined)
    html = environment.from_string(TEMPLATE).render(
        queries=queries,
        metrics=_load_json(metrics),
        settings=settings or {},
        top_n=top_n,
    )
    with atomic_file(out) as handle:
        handle.write(html)


def _load_json(path: str | None) -> dict:
    if not path:
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle) or {}
