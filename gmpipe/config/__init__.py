"""Typed params: one frozen, validated model per ``params.yaml`` section, one module per section.

Stages import only their own section modules (so DVC can list exactly the code a stage depends on);
:mod:`gmpipe.config.params` assembles the whole file and turns validation errors into clear lines.
"""
