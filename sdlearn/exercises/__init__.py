"""Exercises: auto-checkers for the learner's code, and student copies of the notebooks.

- :mod:`sdlearn.exercises.framework`: :class:`Checker`, :func:`check` and how to write an exercise.
- :mod:`sdlearn.exercises.student_copies`: ``python -m sdlearn exercises OUT_DIR``, the notebooks
  with their solutions stubbed and their rubric cells dropped.
- :mod:`sdlearn.exercises.teacher_copies`: ``python -m sdlearn exercises OUT_DIR --teacher``, the answer key,
  and :func:`exercise_index`, each notebook's exercises and their tiers (implement, derive, experiment).
- ``checks_00_tour`` … ``checks_13_control_and_speed``: each notebook's checkers, in the order
  it uses them. Importing this package registers them all in :data:`CHECKERS`.
"""

from sdlearn.exercises.checks_00_tour import check_expected_distinct, check_mean_pairwise_rms
from sdlearn.exercises.checks_01_forward_noising import (
    check_add_noise,
    check_alphas_cumprod,
    check_jump,
    check_x0_from_noise,
)
from sdlearn.exercises.checks_02_noise_schedules import (
    check_cosine_betas,
    check_cosine_log_snr,
    check_leak_by_block,
    check_log_snr,
    check_zero_terminal_snr,
)
from sdlearn.exercises.checks_03_vae import (
    check_factor_by_group,
    check_gaussian_kl,
    check_kl_diagonal_gaussians,
    check_psnr,
    check_reparameterize,
)
from sdlearn.exercises.checks_04_transformer_denoiser import (
    check_attention,
    check_attention_crossover,
    check_modulate,
    check_patchify,
    check_timestep_embedding,
)
from sdlearn.exercises.checks_05_training import check_diffusion_loss, check_ema_update, check_v_target
from sdlearn.exercises.checks_06_samplers import check_ddim_step, check_ddpm_posterior_mean, check_heun_step
from sdlearn.exercises.checks_07_text_and_guidance import (
    check_cfg,
    check_contrastive_loss,
    check_guidance_with_negative,
    check_tokenize,
    check_total_variation,
)
from sdlearn.exercises.checks_08_stable_diffusion import (
    check_inpaint_blend,
    check_latent_mask,
    check_sdedit_kept,
    check_sdedit_start,
    check_strength_sweep,
)
from sdlearn.exercises.checks_09_code_review import (
    check_cfg_batched,
    check_ddpm_reverse_step,
    check_false_alarm_rate,
    check_schedule_sanity,
)
from sdlearn.exercises.checks_10_unet_and_real_sd import (
    check_loss_by_timestep,
    check_resblock,
    check_skip_channels,
)
from sdlearn.exercises.checks_11_flow_matching import (
    check_edm_preconditioning,
    check_error_slope,
    check_flow_training_example,
)
from sdlearn.exercises.checks_12_personalization import (
    check_lora_forward,
    check_lora_merge,
    check_lora_parameter_counts,
    check_paired_change,
)
from sdlearn.exercises.checks_13_control_and_speed import (
    check_consistency_scalings,
    check_edge_map,
    check_inversion_step,
    check_iou_sweep,
)
from sdlearn.exercises.framework import (
    CHECKERS,
    Case,
    Checker,
    ExerciseFailed,
    ExerciseNotDone,
    Mistake,
    check,
    register,
)
from sdlearn.exercises.student_copies import (
    BEGIN_MARKER,
    END_MARKER,
    GUIDANCE,
    GUIDANCE_TITLE,
    RAISES_TAG,
    RUBRIC_TAG,
    STUB,
    STUB_COMMENT,
    default_notebooks_dir,
    find_solution_regions,
    is_rubric_cell,
    make_student_copy,
    strip_solutions,
    student_notebook,
    write_student_copies,
)
from sdlearn.exercises.teacher_copies import (
    RUBRIC_OPENING,
    TEACHER_TITLE,
    TIERS,
    Exercise,
    exercise_index,
    teacher_banner,
    teacher_notebook,
    write_teacher_copies,
)

__all__ = [
    # student copies
    "BEGIN_MARKER", "END_MARKER", "STUB_COMMENT", "STUB", "RAISES_TAG", "GUIDANCE_TITLE", "GUIDANCE",
    "find_solution_regions", "strip_solutions", "student_notebook", "make_student_copy", "default_notebooks_dir",
    "write_student_copies", "RUBRIC_TAG", "is_rubric_cell",
    # the teacher's copy and the exercises' index
    "TIERS", "RUBRIC_OPENING", "TEACHER_TITLE", "Exercise", "exercise_index", "teacher_banner", "teacher_notebook",
    "write_teacher_copies",
    # the checker framework
    "ExerciseFailed", "ExerciseNotDone", "Case", "Mistake", "check", "Checker", "CHECKERS", "register",
    # the checkers, notebook by notebook
    "check_mean_pairwise_rms", "check_expected_distinct",
    "check_alphas_cumprod", "check_add_noise", "check_x0_from_noise", "check_jump",
    "check_cosine_betas", "check_log_snr", "check_zero_terminal_snr", "check_cosine_log_snr", "check_leak_by_block",
    "check_psnr", "check_reparameterize", "check_gaussian_kl", "check_kl_diagonal_gaussians", "check_factor_by_group",
    "check_patchify", "check_timestep_embedding", "check_attention", "check_modulate", "check_attention_crossover",
    "check_diffusion_loss", "check_ema_update", "check_v_target",
    "check_ddpm_posterior_mean", "check_ddim_step", "check_heun_step",
    "check_tokenize", "check_contrastive_loss", "check_cfg", "check_guidance_with_negative", "check_total_variation",
    "check_sdedit_start", "check_latent_mask", "check_inpaint_blend", "check_sdedit_kept", "check_strength_sweep",
    "check_schedule_sanity", "check_ddpm_reverse_step", "check_cfg_batched", "check_false_alarm_rate",
    "check_resblock", "check_skip_channels", "check_loss_by_timestep",
    "check_flow_training_example", "check_edm_preconditioning", "check_error_slope",
    "check_lora_forward", "check_lora_merge", "check_lora_parameter_counts", "check_paired_change",
    "check_edge_map", "check_inversion_step", "check_consistency_scalings", "check_iou_sweep",
]
