"""Text-to-video retrieval (method.md §4 items 9, 22, 28): the image tower encodes every frame,
a temporal aggregation turns the frames into one clip vector, then the image projection.

  configs/video_retrieval.py                 tiny towers on the embedded moving-shapes clips,
                                             from scratch (CPU)
  configs/video_retrieval.py:runlocal        the same, shrunk to a smoke test
  configs/video_retrieval.py:agg=transformer a temporal transformer over learned frame positions
                                             instead of the mean of the frames
  configs/video_retrieval.py:data=msrvtt     MSR-VTT layout: --config.input.data.annotations=
                                             MSRVTT_data.json --config.input.data.videos_dir=DIR
                                             [--config.input.data.test_list=1k-A csv]
  configs/video_retrieval.py:model=base      ViT-B/16 + BERT-base, T = 8 (accelerators)
`--config.init_from=RUN` fine-tunes an image-text run (its towers and heads; the temporal
transformer starts fresh; the tiny default's fixed patch positions need
`--config.model.image.posemb=learn` to load a run of learned ones, such as configs/pretrain.py's);
`--config.input.data.name=frames_folder` reads one folder of frames per video instead of video
files. The objective is ITC with queues and in-batch negatives, every
caption of a clip a positive (`image_id` is the clip), no AMF, no MLM / MVM.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, model="tiny", data="synthetic", agg="mean")
  if arg.model not in ("tiny", "base"):
    raise ValueError(f"config arg model={arg.model!r} is unknown; use tiny or base")
  if arg.data not in ("synthetic", "msrvtt"):
    raise ValueError(f"config arg data={arg.data!r} is unknown; use synthetic or msrvtt")
  if arg.agg not in ("mean", "transformer"):
    raise ValueError(f"config arg agg={arg.agg!r} is unknown; use mean or transformer")
  config = common.base_config(arg.model)
  config.input.data.name = "synthetic_video" if arg.data == "synthetic" else "msrvtt"
  config.model.temporal_agg = arg.agg
  # Random batches rarely hold a clip's direction twins, so nothing would ask the model for
  # frame order; batches of whole groups (the 4 directions of one appearance) do.
  config.input.group_batches = arg.data == "synthetic"
  config.model.num_frames = 4 if arg.model == "tiny" else 8
  config.loss.update(itc=1.0, mlm=0.0, mvm=0.0, kl_align=0.0)
  config.queue.multi_positive = config.queue.in_batch_negatives = True
  config.amf.enabled = False
  # Clips have no image views; the synthetic clips' direction twins get their own recall.
  config.eval.evaluators = ((("retrieval", {}),)
                            + (("direction", {}),) * (arg.data == "synthetic")
                            + (("text_matching", {}),))
  if arg.model == "tiny":
    # T frames per clip cost T images per pair: a smaller batch keeps a step near the image one.
    config.input.batch_size, config.queue.size = 32, 1024
    config.input.data.num_train_images, config.input.data.num_eval_images = 4000, 200
    # At the image default's lr (1e-3) the clip embeddings collapse (eval at chance after 300
    # steps); 3e-4 learns.
    config.optim.lr = 3e-4
    config.total_steps, config.optim.warmup_steps = 600, 60
    # Motion is where things are in each frame. Fixed sin-cos patch positions put that into every
    # frame vector from step 0; learned ones start at 0.02, and towers trained from scratch on
    # captions of colours and shapes learn little of it. Measured (600 steps, temporal
    # transformer): direction R@1 v2t / t2v 28.5 / 27.0 with learned positions (chance 25),
    # 76.0 / 74.3 with sincos2d.
    config.model.image.posemb = "sincos2d"
  else:
    config.input.batch_size, config.input.max_len = 128, 32
    config.optim.lr, config.optim.end_lr = 1e-5, 1e-7
    config.total_steps, config.optim.warmup_steps = 10_000, 500
  if arg.runlocal:
    common.shrink_for_runlocal(config)
    config.input.batch_size, config.queue.size = 16, 256
    config.input.data.num_train_images, config.input.data.num_eval_images = 400, 50
    config.total_steps = 60
  return config
