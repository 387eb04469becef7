# The paper's recipe as the authors' code ran it, shared by every config/llama_<size>_<scheme>.py (where the code
# and the paper's text differ, the code; README, "Paper scale"): pure bf16, C4 in the t5-base tokenizer with one
# document per 256-token row (pads carry no loss, one shuffled pass), Adam without weight decay or clipping, 512
# sequences per step, their warmup, evaluation on 10M validation tokens (reported correctly and as their GPUs
# computed it); embeddings at std 0.02, which the authors state their reported runs used.
#   python data/c4/prepare.py --layout rows --shards 29 --val_shards 2      # 29 shards: 130M's one pass
# Our recipe instead (bf16 autocast, GPT-2 packed data): add config/our_recipe.py after the size's file.

dataset = 'c4'
arch = 'llama'
block_size = 256
vocab_size = 32000  # t5-base's; data in another tokenizer is refused rather than silently used

dtype = 'pure_bfloat16'
embedding_init_std = 0.02  # not the public code's 0.632, which the authors say came from an ablation branch
compile = True

# Adam: AdamW with no weight decay is Adam; linear warmup, then cosine to 0.1x the peak (min_lr, per size)
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.999
grad_clip = 0.0

# the global batch is the recipe's; each size's batch_size is only the most one GPU runs at once, and train.py
# derives the micro-batch and micro-steps from the number of processes (1 to 512 of them: a divisor of 512)
global_batch_size = 512

eval_interval = 1000
eval_tokens = 10_000_000  # non-pad validation tokens, batch after batch of batch_size rows, as theirs
eval_sequences = 3200     # rows for the training-loss estimate, evenly spaced
