# This project's recipe for the paper configs, one file to add after a size's config:
#   python data/c4/prepare.py --layout packed --shards 8 --out_dir data/c4_gpt2
#   torchrun --standalone --nproc_per_node=8 train.py config/llama_350m_lns.py config/our_recipe.py
# bf16 autocast over float32 weights (norm gains train), GPT-2 BPE documents packed end to end (vocabulary
# 50,304), evaluation on eval_sequences evenly spaced windows.

dtype = 'bfloat16'
data_dir = 'data/c4_gpt2'
vocab_size = None  # the data's
