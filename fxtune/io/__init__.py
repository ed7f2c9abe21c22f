"""The io layer: what leaves the process and comes back — adapter files in fxtune's and PEFT's formats.

Formats read data only (JSON, safetensors): nothing is unpickled or executed. What a technique
needs from a format (PEFT's tensor names) it declares on its kind; io asks the kind. May import
everything below it (kit, adapter, frontends, graph); never compose or cli.
"""
