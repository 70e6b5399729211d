"""What a conversion reads: the checkpoint (with the user's pickle consent), its safetensors headers, a LoRA adapter, the merged model, and the real models pip packages carry."""
