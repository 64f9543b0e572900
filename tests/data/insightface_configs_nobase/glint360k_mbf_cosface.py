"""Glint360K, MobileFaceNet, CosFace margin, Partial FC 0.1, on 16 GPUs (a job config without base.py)."""
import os

from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "mbf"
config.resume = False
config.output = "work_dirs/glint360k_mbf"
config.embedding_size = 512
config.sample_rate = 0.1
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 1e-4
config.batch_size = 256
config.lr = 0.2
config.verbose = 10000
config.dali = True
config.dali_aug = False
config.wandb_key = "0123456789abcdef0123456789abcdef01234567"
config.using_wandb = True

config.rec = "/train_tmp/glint360k"
config.num_classes = 360232
config.num_image = 17091657
config.num_epoch = 20
config.warmup_epoch = config.num_epoch // 10
config.gradient_acc = 2
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]

# Things a translator must list rather than run or drop.
config.label_smoothing = 0.1
config.rec_cache = os.path.join("/dev/shm", "glint360k")
config.log_dir = f"{config.output}/logs"
config.hook = __import__("os").system("touch EXECUTED_MARKER")
if config.fp16:
    config.lr = 0.4
