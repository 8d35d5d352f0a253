"""Data path: RLBench demos -> keyframes -> Robot-R1 questions -> ArrayRecord shards.

Public API (see each module for details):
  rlbench_io: Observation, Demo, load_demo, save_demo, list_episodes, decode_depth, …
  keyframes:  discover_keyframes
  mcqa:       McqaConfig, Question, build_question, episode_questions
  extract:    `python -m robot_r1_jax.data.extract`, or extract.extract(demos_dir, out_dir,
              ExtractConfig(...)) -> Manifest. Not imported here: `python -m` would then find the
              module already imported by this package and warn.
  records:    Record, decode_record, read_records (the shard record schema); Manifest and
              open_split (an extractor output folder and one split of it)
  loader:     make_loader(data_dir, split, LoaderConfig(...)) -> Loader of Batch (grain: shuffle,
              patches, tokenize, bucket-pad, per-process shard, checkpointable iterator). Not
              imported here: it imports the model package (flax), which the extractor and the
              reader do not need.
"""

from robot_r1_jax.data.demo import Demo, DemoError, MissingFileError, Observation
from robot_r1_jax.data.keyframes import discover_keyframes
from robot_r1_jax.data.mcqa import (FrameContext, McqaConfig, Question, Workspace, build_question,
                                    episode_questions, movement_text, question_frames)
from robot_r1_jax.data.prompts import QUESTION_TYPES, RobotMetadata
from robot_r1_jax.data.records import (SCHEMA_VERSION, Manifest, Record, RecordError, Split,
                                       decode_record, encode_record, open_split, read_records)
from robot_r1_jax.data.rlbench_io import (EpisodeRef, UnsafePickleError, Variation, decode_depth,
                                          encode_depth, list_episodes, load_demo,
                                          load_episode_variation, load_variation_descriptions,
                                          load_variation_number, save_demo,
                                          save_variation_descriptions)
