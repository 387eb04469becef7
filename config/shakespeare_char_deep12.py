# A deep, narrow Llama for quick CPU ablations: 12 blocks of width 64 on tiny Shakespeare characters, with the
# paper's recipe at toy scale (no weight decay, no clipping, cosine to 0.1x). About 3 minutes on 2 CPU cores.
#   python data/shakespeare_char/prepare.py
#   python train.py config/shakespeare_char_deep12.py --norm_scheme=pre --out_dir=out/deep12_pre
#   python train.py config/shakespeare_char_deep12.py --norm_scheme=lns --out_dir=out/deep12_lns

out_dir = 'out/deep12'
dataset = 'shakespeare_char'

arch = 'llama'
norm_scheme = 'lns'
n_layer = 12
n_head = 4
n_embd = 64
block_size = 64
batch_size = 32

learning_rate = 1e-3
min_lr = 1e-4
max_iters = 1200
warmup_iters = 120
weight_decay = 0.0
grad_clip = 0.0
beta1 = 0.9
beta2 = 0.95  # the trainer's default, and every CPU study's; the paper's Adam has 0.999

eval_interval = 200
eval_sequences = 640
log_interval = 50
