"""LongNet under transformers' own common model tests (ModelTesterMixin, ConfigTester, PipelineTesterMixin,
TrainingTesterMixin), taken from the source distribution of the installed transformers (see
transformers_suites.py). What they cannot cover for LongNet is listed in ``LongNetModelTest``'s docstring.
"""

import sys
import unittest
from unittest import mock

import torch
from transformers.models.auto import modeling_auto
from transformers_suites import suite_folder

from longnet import LongNetConfig, LongNetForCausalLM, LongNetForSequenceClassification, LongNetModel

sys.path.insert(0, str(suite_folder()))
from transformers_tests.generation.test_utils import GenerationTesterMixin  # noqa: E402
from transformers_tests.test_configuration_common import ConfigTester  # noqa: E402
from transformers_tests.test_modeling_common import ModelTesterMixin, ids_tensor  # noqa: E402
from transformers_tests.test_pipeline_mixin import PipelineTesterMixin  # noqa: E402
from transformers_tests.test_training_mixin import TrainingTesterMixin  # noqa: E402


class LongNetModelTester:
    """Tiny configs and inputs: branches short enough that the sequences cross several segments of each."""

    base_model_class = LongNetModel
    causal_lm_class = LongNetForCausalLM
    sequence_classification_class = LongNetForSequenceClassification

    def __init__(self, parent, batch_size: int = 3, seq_length: int = 13):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = True
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.num_key_value_heads = 2

    def get_config(self) -> LongNetConfig:
        return LongNetConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=37,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=512,
            segment_lengths=[4, 8],
            dilation_rates=[1, 2],
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1:, :3] = 0  # left padding, as batched generation makes
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class LongNetModelTest(
    ModelTesterMixin, GenerationTesterMixin, PipelineTesterMixin, TrainingTesterMixin, unittest.TestCase
):
    """transformers' common tests on LongNet.

    What they skip here, and why (``pytest -rs`` lists each skip's reason):
    - SDPA, flash and flex attention (``test_eager_matches_sdpa_*``, ``test_flash_attn_*``, ``test_sdpa_*``):
      those kernels compute dense attention, a different model; LongNet's ``_supports_*`` flags are False.
      The fused dilated kernel is checked against the eager reference in test_dilated_attention.py.
    - PipelineTesterMixin's tasks: its task tests live in transformers' ``tests/pipelines/`` (not in the
      sdist) and load the Hub's tiny checkpoints (none is LongNet); tasks of other modalities need timm,
      av or pytesseract. test_generation.py runs the text-generation, feature-extraction and
      text-classification pipelines.
    - Hardware and engines CI does not have: an accelerator or several, MPS, the kernels library,
      DeepSpeed; ``@slow`` tests (RUN_SLOW; among them compiled training, which test_ecosystem.py covers).
    - Features LongNet does not have: position embeddings, axial or partial RoPE, sliding windows,
      sparse experts (router logits, grouped_mm), sub-configs, a sequence-to-sequence head,
      ``_keep_in_fp32_modules``, legacy checkpoint key renames ("No conversion found").
    - ``test_bc_cache_name_forward`` runs only for a plain DynamicCache; LongNet returns its bounded
      LongNetCache, and test_generation.py checks ``past_key_values=`` (deprecated) against ``cache=``.
    """

    test_can_init_all_missing_weights_before_2023 = True  # the suite runs it only for models it dates after 2022
    all_model_classes = (LongNetModel, LongNetForCausalLM, LongNetForSequenceClassification)
    pipeline_model_mapping = {
        "feature-extraction": LongNetModel,
        "text-classification": LongNetForSequenceClassification,
        "text-generation": LongNetForCausalLM,
        "zero-shot": LongNetForSequenceClassification,
    }

    @classmethod
    def setUpClass(cls):
        # The common tests tell a base model from one with a head by transformers' own name tables, which
        # list the models inside the library only (AutoModel.register does not add to them): list LongNet's
        # classes there while this class runs.
        cls.name_tables = [
            mock.patch.dict(getattr(modeling_auto, table), {"longnet": model_class.__name__})
            for table, model_class in (
                ("MODEL_MAPPING_NAMES", LongNetModel),
                ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", LongNetForCausalLM),
                ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", LongNetForSequenceClassification),
            )
        ]
        for table in cls.name_tables:
            table.start()

    @classmethod
    def tearDownClass(cls):
        for table in cls.name_tables:
            table.stop()

    def setUp(self):
        self.model_tester = LongNetModelTester(self)
        self.config_tester = ConfigTester(self, config_class=LongNetConfig, hidden_size=32, num_attention_heads=4)

    def test_config(self):
        self.config_tester.run_common_tests()
