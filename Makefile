# `make demo` segments the bundled example frames with the shipped checkpoint; `make app` serves the Gradio demo on
# 127.0.0.1 (APP_PORT, default 7860); `make test` runs the whole suite.
# `make train-cpu` runs (or, run again, resumes) the CPU long run that trains the next weights; `make release` ships
# its best model. All create .venv and install the pinned requirements first if needed.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

KVASIR_SEG_DIR ?= ../shared/data/kvasir-seg
NOPOLYP_DIR ?= ../shared/data/nopolyp
# The CPU long run that trains the next weights: its recipe, its checkpoints and its snapshot (fp16 EMA weights after
# every epoch), both on this machine only (run outputs stay out of the repository): on a new machine the recipe starts
# again from the shipped weights.
TRAIN_RECIPE ?= recipes/cpu_negatives.yaml
TRAIN_OUTPUT_DIR ?= runs/cpu-v3
TRAIN_SNAPSHOT_DIR ?= snapshots/cpu-v3

.PHONY: install demo app test test-all train-cpu release int8 negative-probes

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --editable .
	touch $@

demo: install
	$(BIN)/python predict.py examples/ --model . --output_dir outputs/demo

APP_PORT ?= 7860

app: install
	GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 $(BIN)/python app.py --model . --server_name 127.0.0.1 --server_port $(APP_PORT)

# Outside CI, `make test` leaves out the tests marked slow (other transformers releases, the browser, video, the
# shipped model's flip-TTA evaluation: about 3 of its 13 minutes on 2 cores); CI (CI=true) and `make test-all` run all.
PYTEST_SELECTION = $(if $(filter true,$(CI)),,-m "not slow")

test: install
	$(BIN)/python -m pytest tests -q $(PYTEST_SELECTION)

test-all: install
	$(BIN)/python -m pytest tests -q

# Resumes from the newest checkpoint in TRAIN_OUTPUT_DIR, else from TRAIN_SNAPSHOT_DIR (fp16 EMA weights, rewritten
# after every epoch) at its epoch, else starts the recipe.
train-cpu: install
	$(BIN)/python train_accelerate.py --config $(TRAIN_RECIPE) \
	  --dataset_name $(KVASIR_SEG_DIR) --negative_dataset_name $(NOPOLYP_DIR) --output_dir $(TRAIN_OUTPUT_DIR) \
	  --resume_from_checkpoint latest --snapshot_dir $(TRAIN_SNAPSHOT_DIR)

# When the long run has ended: its best model (the epoch with the best `selection_score`: validation mDice and the
# polyp-free frames left quiet) becomes the shipped model, stored in fp16 with tensors beyond fp16's range in fp32
# (config.json's dtype float32 loads them as float32); the run's logs become training/$(RELEASE_STAGE), and the card's
# figures are measured again and regenerated. RELEASE_STAGE names the stage being released (stage 12 is shipped).
RELEASE_FROM ?= $(TRAIN_OUTPUT_DIR)
RELEASE_STAGE ?= stage13
EVALUATE = $(BIN)/python evaluate_model.py --model . --dataset_name $(KVASIR_SEG_DIR)
# The share of validation frames with a polyp that the presence threshold must still judge to hold one.
PRESENCE_SENSITIVITY ?= 0.98

release: install
	$(BIN)/python -c 'import sys; from polyp_segmentation.checkpoints import store_weights_in_float16; \
	  store_weights_in_float16(*sys.argv[1:])' $(RELEASE_FROM)/model.safetensors model.safetensors
	cp $(RELEASE_FROM)/config.json .
	mkdir -p training/$(RELEASE_STAGE)
	cp $(RELEASE_FROM)/metrics.jsonl $(RELEASE_FROM)/invocations.jsonl $(RELEASE_FROM)/eval_results.json \
	  training/$(RELEASE_STAGE)/
	$(EVALUATE) --split validation --negative_dataset_name $(NOPOLYP_DIR) \
	  --choose_presence_threshold $(PRESENCE_SENSITIVITY) --output_json eval/validation.json
	$(EVALUATE) --split test --output_json eval/test.json
	$(EVALUATE) --split test --tta --output_json eval/test_tta.json
	$(MAKE) int8
	$(BIN)/python make_model_card.py --dataset_name $(KVASIR_SEG_DIR) --negative_dataset_name $(NOPOLYP_DIR)

# The int8 model for CPUs (OpenVINO), calibrated on training frames and checked against the float32 model before it is
# written; its test-split figures go beside float32's in the card.
INT8_MODEL ?= openvino/model_int8.xml
int8: install
	$(BIN)/python export_openvino.py --model . --dataset_name $(KVASIR_SEG_DIR) --negative_dataset_name $(NOPOLYP_DIR) \
	  --output $(INT8_MODEL)
	$(EVALUATE) --split test --openvino $(INT8_MODEL) --output_json eval/test_int8.json

# Short runs that decide how the polyp-free frames are trained on before the long run: the shipped weights fine-tuned
# for PROBE_EPOCHS epochs with each RATIO:DICE_ON_EMPTY_MASKS:AUGMENTATION (seed or strong) of PROBES, one after the
# other, each resuming where it stopped. Their metrics.jsonl files (training subset, validation mDice, false alarms)
# are the comparison.
PROBE_EPOCHS ?= 6
PROBES ?= 0.25:true:seed 0.25:false:seed 0.5:true:seed 0.25:true:strong
negative-probes: install
	for probe in $(PROBES); do \
	  ratio=$$(echo $$probe | cut -d: -f1); dice=$$(echo $$probe | cut -d: -f2); aug=$$(echo $$probe | cut -d: -f3); \
	  $(BIN)/python train_accelerate.py \
	    --dataset_name $(KVASIR_SEG_DIR) --negative_dataset_name $(NOPOLYP_DIR) --negative_ratio $$ratio \
	    --closeup_probability 0.15 --init_from . --config_overrides "dice_on_empty_masks=$$dice" \
	    $$([ "$$aug" = strong ] && echo --strong_augmentation) \
	    --output_dir runs/probes/ratio$$ratio-dice_on_empty_$$dice$$([ "$$aug" = strong ] && echo -strong) \
	    --resolution 256 --train_crop_size 160 --train_scale_jitter 0.75 1.33 --train_eval_samples 60 \
	    --num_train_epochs $(PROBE_EPOCHS) --per_device_train_batch_size 16 --learning_rate 2e-4 --weight_decay 0.05 \
	    --warmup_ratio 0.05 --channels_last --float32_matmul_precision medium --seed 60 \
	    --checkpointing_steps epoch --save_total_limit 1 --report_to none --resume_from_checkpoint latest || exit 1; \
	done
