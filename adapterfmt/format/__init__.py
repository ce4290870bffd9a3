"""What the spec defines (layer 2): manifests, strict JSON, safetensors reading and writing, atomic writes,
checksums, limits, fingerprints, bit packing and tensor codecs, the :class:`~adapterfmt.Adapter` object with
load / save / validate, and the golden example files.

May import: ``adapterfmt.errors``, ``adapterfmt.plugin`` (to look up kinds, codecs and extensions that plugins
provide). Never the verbs, the Hub or the demo: ``hf://`` paths reach ``load`` through a resolver the hub
layer registers (:func:`adapterfmt.format.adapter.register_resolver`).
"""
