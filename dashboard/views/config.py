"""Run config: what the job said about itself (``config/monitor`` text, ``run.json``)."""

from __future__ import annotations

import json

import streamlit as st

from dashboard import widgets
from dashboard.views import Context
from monitor import schema


def render(ctx: Context) -> None:
    for run, reader in zip(ctx.runs, ctx.readers):
        st.subheader(f"Run {run.name} · {run.status}")
        texts = widgets.texts_of(reader, schema.TAG_RUN_CONFIG)
        if texts:
            step, text = texts[-1]
            st.caption(f"`{schema.TAG_RUN_CONFIG}` as the job logged it at step {step}")
            st.json(_json_of(text))
        else:
            st.info(f"Run {run.name} logged no `{schema.TAG_RUN_CONFIG}` text.")
        if run.meta:
            with st.expander("run.json (state, pid, host, layers)"):
                st.json(run.meta)


def _json_of(text: str):
    """The JSON inside the ```json fenced text the hook writes, else the text itself."""
    body = text.strip().removeprefix("```json").removesuffix("```").strip()
    try:
        return json.loads(body)
    except ValueError:
        return {"text": text}
