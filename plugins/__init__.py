"""Built-in plugins: ``methods/`` (one module per method family), ``formats/`` (one module per foreign
format) and ``codecs`` (the built-in tensor codecs). Each imports only adapterfmt's public API
(``import adapterfmt as af``), exactly as a third-party plugin would."""
