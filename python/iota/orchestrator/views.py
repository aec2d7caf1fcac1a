"""What people (and Prometheus) see of a run: the dashboard page and the metrics text.

Both are rendered from `Orchestrator.state()`; the page fetches /api/state
itself every two seconds, so it needs no server-side templating."""

from __future__ import annotations

from typing import Any


def prometheus(state: dict[str, Any]) -> str:
    """The Prometheus text exposition format (version 0.0.4) of a state."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP iota_{name} {help_text}")
        lines.append(f"# TYPE iota_{name} {kind}")
        lines.extend(f"iota_{name}{labels} {value}" for labels, value in samples)

    losses = state["losses"]
    metric("samples_done_total", "counter", "Samples whose backward pass reached the first stage.",
           [("", state["samples"]["done"])])
    metric("samples_target", "gauge", "Samples this run trains on.", [("", state["samples"]["total"])])
    metric("tokens_per_second", "gauge", "Training tokens per second since the first lease.",
           [("", state["tokens_per_second"])])
    metric("train_loss", "gauge", "Loss of the latest sample (nats per token).",
           [("", losses[-1][1])] if losses else [])
    if state["evals"]:
        metric("val_loss", "gauge", "Validation loss of the latest merged model.", [("", state["evals"][-1]["val_loss"])])
    metric("miners", "gauge", "Live miners per stage.",
           [(f'{{stage="{s["stage"]}"}}', len(s["miners"])) for s in state["stages"]])
    metric("stage_version", "gauge", "Latest merged weights version per stage.",
           [(f'{{stage="{s["stage"]}"}}', s["version"]) for s in state["stages"]])
    metric("merges_total", "counter", "Merge rounds by outcome.",
           [(f'{{outcome="{o}"}}', sum(1 for m in state["merges"] if m["outcome"] == o))
            for o in ("merged", "timeout")])
    metric("wire_bytes_total", "counter", "Bytes miners sent, by kind.",
           [(f'{{kind="{k}"}}', state["traffic"][k]) for k in ("activations", "gradients", "allreduce")])
    metric("miners_lost_total", "counter", "Miners dropped after going silent.", [("", len(state["miners_lost"]))])
    return "\n".join(lines) + "\n"


DASHBOARD_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>iota swarm</title>
<style>
body{font:14px system-ui,sans-serif;margin:2em;color:#222;max-width:70em}
table{border-collapse:collapse}td,th{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:left}
.k{color:#777}svg{border:1px solid #ddd;background:#fafafa}
</style></head><body>
<h1>iota swarm</h1>
<p id="summary" class="k">loading…</p>
<h2>Loss</h2>
<svg id="chart" width="700" height="240"></svg>
<p class="k">grey: training loss per sample · blue: validation loss of merged weights</p>
<h2>Stages</h2>
<table id="stages"><thead><tr><th>stage</th><th>phase</th><th>version</th><th>miners</th></tr></thead><tbody></tbody></table>
<script>
function fmt(x,d){return x==null?"–":Number(x).toFixed(d)}
function line(points,xs,ys,color,width){
  if(!points.length)return "";
  return '<polyline fill="none" stroke="'+color+'" stroke-width="'+width+'" points="'+
    points.map(p=>xs(p[0]).toFixed(1)+","+ys(p[1]).toFixed(1)).join(" ")+'"/>';
}
async function refresh(){
  const s=await (await fetch("api/state")).json();
  const t=s.traffic, bytes=t.activations+t.gradients+t.allreduce;
  document.getElementById("summary").textContent=
    s.status+" · samples "+s.samples.done+"/"+s.samples.total+" · "+fmt(s.tokens_per_second,0)+" tokens/s · "+
    "compression "+(s.compression_ratio?fmt(s.compression_ratio,1)+"×":"–")+" · "+(bytes/1e6).toFixed(1)+" MB on the wire · "+
    s.merges.filter(m=>m.outcome=="merged").length+" merges · "+s.miners_lost.length+" miners lost";
  const losses=s.losses;
  const all=losses.map(p=>p[1]).concat(s.evals.map(e=>e.val_loss));
  const W=700,H=240,n=Math.max(s.samples.total,1);
  const lo=Math.min(...all,0),hi=Math.max(...all,1);
  const xs=x=>10+(W-20)*x/n, ys=y=>H-10-(H-20)*(y-lo)/(hi-lo||1);
  const ev=s.evals.map(e=>[e.samples_done,e.val_loss]);
  document.getElementById("chart").innerHTML=line(losses,xs,ys,"#999",1)+line(ev,xs,ys,"#36c",2)+
    '<text x="12" y="16" font-size="11">'+fmt(hi,2)+'</text><text x="12" y="'+(H-12)+'" font-size="11">'+fmt(lo,2)+'</text>';
  document.querySelector("#stages tbody").innerHTML=s.stages.map(st=>"<tr><td>"+st.stage+"</td><td>"+st.phase+
    " (round "+st.round+")</td><td>"+st.version+"</td><td>"+st.miners.map(m=>m.hotkey.slice(0,8)+"… q"+
    (m.stats.queue??0)).join(", ")+"</td></tr>").join("");
}
refresh();setInterval(refresh,2000);
</script></body></html>
"""
