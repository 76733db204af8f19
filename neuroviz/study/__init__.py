"""Blind user studies: which description of a neuron do people find best?

One module per part of a study's life:

- :mod:`.design`: the items, methods and gold items of a study, fixed at creation
  (``choose_items``, ``create_study``, managing studies);
- :mod:`.rating`: the rater's side (``study_by_token``, ``register_rater``, ``next_item``,
  ``submit_vote``), blind by construction;
- :mod:`.results`: win rates, ratings, agreement, gold scores and progress;
- :mod:`.statistics`: the intervals and Fleiss' kappa (also used by :mod:`neuroviz.evaluate`);
- :mod:`.export`: CSV of scores and of every vote;
- :mod:`.pictures`: the pictures raters see, rendered once at creation and kept in the study;
- :mod:`.storage`: the SQLite file the state lives in, with every SQL statement.

Typical use (owner side, then rater side)::

    items = choose_items(store, [run.run_key], methods=["clip_dissect", "dnd"], per_layer=20)
    study = create_study(store, "layer4 labels", items, methods=["clip_dissect", "dnd"])
    study.rater_link                        # "?study=<secret token>": give this to raters

    public = study_by_token(store, token)   # RaterStudy: no method names in it
    rater = register_rater(store, public.study_id, "Ada")   # rater.secret: their cookie / personal link
    rater = rater_by_secret(store, public.study_id, rater.secret)
    task = next_item(store, public.study_id, rater.rater_id)   # RatingTask or None when done
    submit_vote(store, public.study_id, rater.rater_id, task.item_id, "B", {"A": 2, "B": 5})

    results = study_results(store, study.study_id)   # win rates, ratings, Fleiss' kappa
    print(results_csv(results)); print(votes_csv(store, study.study_id))
"""

from .design import (
                     DEFAULT_PUBLIC_TITLE,
                     NONE_FITS,
                     SECRET_PARAM,
                     SPECIAL_CHOICES,
                     UNINTERPRETABLE,
                     GoldItem,
                     SkippedItem,
                     Study,
                     StudyError,
                     StudyItem,
                     choose_gold_items,
                     choose_items,
                     create_study,
                     default_methods,
                     delete_study,
                     freeze_missing_pictures,
                     get_study,
                     labelled_methods,
                     link_query,
                     list_studies,
                     make_gold_item,
                     set_study_open,
                     study_items,
)
from .export import results_csv, votes_csv
from .rating import (
                     CHOICE_TITLES,
                     INSTRUCTIONS,
                     RATING_SCALE,
                     Rater,
                     RaterStudy,
                     RatingOption,
                     RatingTask,
                     TaskPictures,
                     VoteReceipt,
                     next_item,
                     rater_by_secret,
                     rater_progress,
                     register_rater,
                     study_by_token,
                     submit_vote,
                     task_for,
                     task_pictures,
)
from .results import (
                     MIN_GOLD_ACCURACY,
                     LayerScores,
                     MethodScore,
                     RaterProgress,
                     RaterSummary,
                     StudyProgress,
                     StudyResults,
                     study_progress,
                     study_results,
)
from .statistics import fleiss_kappa, mean_interval, mean_sem, wilson_interval
from .storage import StudiesBusyError, StudiesMigrationError, studies_path

__all__ = [
    "CHOICE_TITLES", "DEFAULT_PUBLIC_TITLE", "INSTRUCTIONS", "MIN_GOLD_ACCURACY", "NONE_FITS", "RATING_SCALE", "SECRET_PARAM",
    "SPECIAL_CHOICES", "UNINTERPRETABLE",
    "GoldItem", "LayerScores", "MethodScore", "Rater", "RaterProgress", "RaterStudy", "RaterSummary", "RatingOption",
    "RatingTask", "SkippedItem", "StudiesBusyError", "StudiesMigrationError", "Study", "StudyError", "StudyItem",
    "StudyProgress", "StudyResults", "TaskPictures", "VoteReceipt",
    "choose_gold_items", "choose_items", "create_study", "default_methods", "delete_study", "fleiss_kappa",
    "freeze_missing_pictures", "get_study", "labelled_methods", "link_query", "list_studies", "make_gold_item",
    "mean_interval", "mean_sem", "next_item", "rater_by_secret", "rater_progress", "register_rater", "results_csv",
    "set_study_open", "studies_path", "study_by_token", "study_items", "study_progress", "study_results", "submit_vote",
    "task_for", "task_pictures", "votes_csv", "wilson_interval",
]
