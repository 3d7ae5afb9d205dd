"""lassie: a Cog inference server for the Lassie FLUX.1 LoRA fine-tune."""
