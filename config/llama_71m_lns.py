# Llama 71M with LayerNorm Scaling: the paper's recipe (71M parameters with its 32,000-token vocabulary;
# not in the paper's Table 1).
# The pre twin is llama_71m_pre.py; every other scheme is one flag away, e.g. --norm_scheme=mix.
#   python data/c4/prepare.py && torchrun --standalone --nproc_per_node=8 train.py config/llama_71m_lns.py
# GPT-2 BPE (50,304 ids) replaces the paper's T5 tokenizer, so parameter counts and perplexities differ from its own.

out_dir = 'out/llama_71m_lns'
dataset = 'c4'

arch = 'llama'
norm_scheme = 'lns'
n_layer = 12
n_head = 8
n_embd = 512
ffn_hidden = 1368
block_size = 256
vocab_size = 50304

# 512 sequences of 256 tokens per step = batch_size x gradient_accumulation_steps, where the accumulation steps
# count micro-steps over all GPUs together: torchrun divides them among the GPUs (8 GPUs: 64 x 1 each).
# For another GPU count that divides 8 nothing changes; with less memory per GPU, halve batch_size and
# double gradient_accumulation_steps.
batch_size = 64
gradient_accumulation_steps = 8

# Adam without weight decay or clipping; linear warmup over 10% of the steps, then cosine to 0.1x the peak
learning_rate = 1e-3
min_lr = 1e-4
max_iters = 10000
warmup_iters = 1000
weight_decay = 0.0
beta2 = 0.999
grad_clip = 0.0

eval_interval = 1000
eval_iters = 50  # x 64 x 256 tokens per split
dtype = 'bfloat16'
compile = True
