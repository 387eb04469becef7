# Llama 1B with Pre-LN: the paper's recipe (1.34B parameters with its 32,000-token vocabulary;
# C4 validation perplexity 17.02 in the paper's Table 1).
# The lns twin is llama_1b_lns.py; every other scheme is one flag away, e.g. --norm_scheme=mix.
#   python data/c4/prepare.py && torchrun --standalone --nproc_per_node=8 train.py config/llama_1b_pre.py
# GPT-2 BPE (50,304 ids) replaces the paper's T5 tokenizer, so parameter counts and perplexities differ from its own.

out_dir = 'out/llama_1b_pre'
dataset = 'c4'

arch = 'llama'
norm_scheme = 'pre'
n_layer = 24
n_head = 32
n_embd = 2048
ffn_hidden = 5461
block_size = 256
vocab_size = 50304

# 512 sequences of 256 tokens per step = batch_size x gradient_accumulation_steps, where the accumulation steps
# count micro-steps over all GPUs together: torchrun divides them among the GPUs (16 GPUs: 32 x 1 each).
# For another GPU count that divides 16 nothing changes; with less memory per GPU, halve batch_size and
# double gradient_accumulation_steps.
batch_size = 32
gradient_accumulation_steps = 16

# Adam without weight decay or clipping; linear warmup over 1,000 steps (the paper's 1B setting),
# then cosine to 0.1x the peak
learning_rate = 5e-4
min_lr = 5e-5
max_iters = 100000
warmup_iters = 1000
weight_decay = 0.0
beta2 = 0.999
grad_clip = 0.0

eval_interval = 1000
eval_iters = 50  # x 32 x 256 tokens per split
dtype = 'bfloat16'
compile = True
