"""The weights directory, torch-free: its layout and checks (`layout`), what is missing fetched from tars or the hub
(`provision`), a folder from one tar (`downloads`), the Lassie LoRA (`lassie_lora`) and the provenance record
(`manifest`). May import `lassie.fetch`, `lassie.request` and `lassie.settings`; nothing is re-exported here."""
