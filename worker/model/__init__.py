"""The sharded Llama-family model: one pipeline stage, one tensor-parallel slice.

`decoder.StageModel` is a plain decoder whose parameters keep their Hugging Face names and
hold exactly `spotserve.layout.position_slices`; `layers` has its blocks with explicit
all-reduces; `attention` runs over a paged KV cache; `rope` has rotary embeddings (with
Llama 3.1 scaling); `loader` reads a position's slices from a HF checkpoint; `parallel`
builds the process groups of a configuration epoch and the stage hand-off.
"""
