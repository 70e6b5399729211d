"""Medical prompt templates as data: an index of TOML files, each with instructions and an output contract.

``get_template(name)`` loads one; ``Template.messages(inputs)`` builds the chat
messages (safety preamble + task instructions + contract in the system message,
the case in the user message), rendered in a sandboxed Jinja environment; the
model's own chat template then turns them into its prompt format (runtime).
``Template.parse(reply)`` applies the output contract to the reply, ignoring
any ``<think>`` block.
"""

from edgemed.templates.library import Template, get_template, load_templates

__all__ = ["Template", "get_template", "load_templates"]
