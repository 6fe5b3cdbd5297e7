"""The embedded demo zoo: templated corpora, a byte-level BPE tokenizer and small Llama models."""
