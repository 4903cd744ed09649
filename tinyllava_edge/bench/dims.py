"""Real small-LMM dimensions (no weights): Qwen2-0.5B's and Phi-2's LLMs and SigLIP-so400m-patch14-384's
tower, from the released config.json files. Shared by the bench (bench-scale, phi2-scale) and
benchmarks/train_gpu.py."""

QWEN2_05B = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
SIGLIP_SO400M = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                     num_hidden_layers=27, num_attention_heads=16, image_size=384, patch_size=14,
                     hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
# microsoft/phi-2 (2.7B), the LLM of TinyLLaVA-Phi-2-SigLIP-3.1B
PHI2 = dict(model_type="phi", hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=51200, max_position_embeddings=2048, partial_rotary_factor=0.4,
            rope_theta=10000.0, layer_norm_eps=1e-5, hidden_act="gelu_new", qk_layernorm=False,
            tie_word_embeddings=False)
