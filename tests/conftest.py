import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the flat project files import as modules
torch.set_num_threads(1)  # tiny models: one thread is faster, and safe when other processes share the cores


# The quick lane, python -m pytest -q -m "not slow" (about 2 minutes on 2 cores), leaves out the tests listed here and
# those marked @pytest.mark.slow: the ones that took longest in a full run on this project's 2-core machine, kept so
# that every test file keeps tests of its own in the lane. The full suite (what CI runs) runs them all.
SLOW = {
    "tests/test_owned.py::test_two_pretrainings_with_other_recipes_on_one_out_never_both_write",
    "tests/test_owned.py::test_tqdm_disable_is_obeyed_by_every_bar",
    "tests/test_faults.py::test_fault[shard-twice-beside-a-sweep]",
    "tests/test_identity.py::test_pretrain_resume_refuses_another_recipe_and_says_when_it_starts_fresh",
    "tests/test_torchrun_setup.py::test_ranks_that_cannot_meet_end_with_one_line_within_the_timeout",
    "tests/test_gpu_check.py::test_a_failing_check_is_reported_failed_and_the_others_are_kept",
    "tests/test_gpu_check.py::test_the_table_lists_every_check_and_is_printed",
    "tests/test_faults.py::test_fault[bad-image-in-a-stream]",
    "tests/test_recipes.py::test_e2vpt_official_search_trains_as_the_official_flow",
    "tests/test_identity.py::test_two_image_folders_on_one_out_both_run",
    "tests/test_benches.py::test_a_bench_runs_in_its_micro_mode[bench_data.py]",
    "tests/test_benches.py::test_a_bench_runs_in_its_micro_mode[bench_fewshot.py]",
    "tests/test_benches.py::test_a_bench_runs_in_its_micro_mode[bench_vit.py]",
    "tests/test_benches.py::test_the_contact_sheet_is_written",
    "tests/test_benches.py::test_the_embedded_backbone_builder_runs",
    "tests/test_faults.py::test_ctrl_c_rows_hold_when_the_suite_ignores_sigint",
    "tests/test_faults.py::test_fault[cache-under-a-file]",
    "tests/test_faults.py::test_fault[ctrl-c]",
    "tests/test_faults.py::test_fault[data-script-bad-flag]",
    "tests/test_faults.py::test_fault[disk-full]",
    "tests/test_faults.py::test_fault[fifo-in-class-folder]",
    "tests/test_faults.py::test_fault[garbage-jpg]",
    "tests/test_faults.py::test_fault[image-60000x1]",
    "tests/test_faults.py::test_fault[master-port-not-a-number]",
    "tests/test_faults.py::test_fault[max-gb-not-a-number-synthetic]",
    "tests/test_faults.py::test_fault[more-shots-than-a-class-has]",
    "tests/test_faults.py::test_fault[named-weights-placed-by-hand-wrong]",
    "tests/test_faults.py::test_fault[nan-loss]",
    "tests/test_faults.py::test_fault[out-under-a-file]",
    "tests/test_faults.py::test_fault[pickled-weights]",
    "tests/test_faults.py::test_fault[pretrain-ctrl-c]",
    "tests/test_faults.py::test_fault[pretrain-disk-full-before-any-epoch]",
    "tests/test_faults.py::test_fault[pretrain-killed-then-resume]",
    "tests/test_faults.py::test_fault[pretrain-resume-of-another-config]",
    "tests/test_faults.py::test_fault[results-not-a-file]",
    "tests/test_faults.py::test_fault[results-unreadable]",
    "tests/test_faults.py::test_fault[shard-out-of-range]",
    "tests/test_faults.py::test_fault[shots-leave-no-val]",
    "tests/test_faults.py::test_fault[sigterm]",
    "tests/test_faults.py::test_fault[stray-local-rank]",
    "tests/test_faults.py::test_fault[truncated-safetensors]",
    "tests/test_faults.py::test_fault[two-pretrains-one-out]",
    "tests/test_faults.py::test_fault[two-sweeps-one-out]",
    "tests/test_faults.py::test_fault[weights-of-another-shape]",
    "tests/test_fewshot.py::test_embedded_backbone_and_pvp_are_built_once_then_reused",
    "tests/test_fewshot.py::test_every_method_writes_a_results_line_summary_and_plot",
    "tests/test_fewshot.py::test_torchrun_sweep_shards_runs_and_rank0_writes_the_table",
    "tests/test_gpu_check.py::test_every_check_passes_or_is_skipped_with_its_reason",
    "tests/test_identity.py::test_an_interrupted_embedded_build_resumes_on_the_next_run",
    "tests/test_identity.py::test_another_synthetic_task_on_one_out_prints_only_its_table",
    "tests/test_identity.py::test_two_pretrainings_of_one_out_take_turns_and_the_second_reuses",
    "tests/test_identity.py::test_two_sweeps_on_a_fresh_checkout_build_the_embedded_pieces_once",
    "tests/test_recipes.py::test_official_pruning_chooses_the_pair_on_val_and_records_it",
    "tests/test_registry.py::test_a_new_method_file_plus_one_entry_runs_in_both_scripts",
    "tests/test_registry.py::test_pretrained_and_then_started_from_through_both_scripts[e2vpt]",
    "tests/test_registry.py::test_pretrained_and_then_started_from_through_both_scripts[vpt-shallow]",
    "tests/test_registry.py::test_pretrained_and_then_started_from_through_both_scripts[vpt]",
    "tests/test_shipped_backbone.py::test_the_build_command_runs_at_micro_scale",
    "tests/test_shipped_backbone.py::test_the_prompt_cosine_script_runs_on_it",
    "tests/test_speed.py::test_compile_flag_trains_and_evaluates_through_torch_compile",
    "tests/test_stream.py::test_pretraining_killed_mid_epoch_resumes_to_the_same_weights[1]",
    "tests/test_stream.py::test_pretraining_killed_mid_epoch_resumes_to_the_same_weights[2]",
    "tests/test_stream.py::test_two_shards_run_every_planned_run_once_and_either_writes_the_whole_table",
    "tests/test_vit.py::test_google_npz_parity_with_timm_loader[base]",
    "tests/test_vit.py::test_main_loads_a_checkpoint_into_a_preset",
    "tests/test_vit.py::test_main_prints_counts_and_shape",
    "tests/test_vit.py::test_torchvision_parity[base]",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in SLOW:
            item.add_marker(pytest.mark.slow)
