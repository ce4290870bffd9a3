"""Built-in foreign-format plugins, one module per format (PEFT, mlx-lm, GGUF, kohya/LyCORIS, torchtune,
diffusers). Each imports only ``import adapterfmt as af``, as a third party would."""
