"""``python -m neuroviz study create|list|add-rater|results|export|close|delete``: blind user studies."""

from __future__ import annotations

import argparse

from .. import catalog
from ..store import Store
from ..study import (
    StudyError,
    StudyResults,
    choose_items,
    create_study,
    delete_study,
    freeze_missing_pictures,
    get_study,
    labelled_methods,
    link_query,
    list_studies,
    register_rater,
    results_csv,
    set_study_open,
    study_progress,
    study_results,
    votes_csv,
)
from ._common import comma_list, non_negative_int, output_file, output_path, positive_int, store_from


def _resolve_runs(store: Store, args: argparse.Namespace) -> list[str]:
    """Run keys from --runs, or the newest run per layer of --model (--layers, --probe)."""
    if args.runs:
        return comma_list(args.runs) or []
    if not args.model:
        raise StudyError("Name the runs: --runs KEY,KEY or --model SPEC [--layers a,b] [--probe NAME].")
    runs = catalog.newest_runs_by_layer(store, args.model, comma_list(args.layers), args.probe)
    return [run.run_key for run in runs]


def _cmd_create(args: argparse.Namespace) -> int:
    store = store_from(args)
    run_keys = _resolve_runs(store, args)
    methods = comma_list(args.methods) or list(labelled_methods(store, run_keys))
    if len(methods) < 2:
        raise StudyError(f"Need labels from at least two methods on these runs; found {', '.join(methods) or 'none'}. "
                         "Run methods first (`python -m neuroviz label ...`) or pass --methods.")
    items = choose_items(store, run_keys, methods, per_layer=args.per_layer, seed=args.seed)
    if not items:
        raise StudyError(f"No neuron has labels from all of {', '.join(methods)} on these runs.")
    study = create_study(store, args.name, items, methods, raters_per_item=args.raters_per_item, gold_items=args.gold,
                         seed=args.seed, n_images=args.images)
    print(f"study {study.study_id}: '{study.name}', {study.n_items - study.n_gold} items + {study.n_gold} gold, "
          f"methods {', '.join(study.methods)}, {study.raters_per_item} raters per item")
    for note in study.notes:
        print("note:", note)
    if study.skipped:
        print(f"skipped {len(study.skipped)} items without labels from every method")
    print(f"rater token: {study.token}")
    print(f"rater link:  {study.rater_link}   (append to the dashboard's URL)")
    args._result = {"study_id": study.study_id, "token": study.token}
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    store = store_from(args)
    studies = list_studies(store)
    if not studies:
        print("no studies yet; create one with `python -m neuroviz study create`")
    for s in studies:
        freeze_missing_pictures(store, s.study_id)  # a study of an older version: raters need only it
        progress = study_progress(store, s.study_id)
        state = "open" if s.is_open else "closed"
        print(f"{s.study_id}  '{s.name}'  {state}  items={s.n_items - s.n_gold}+{s.n_gold} gold  "
              f"complete={progress.items_complete}  votes={progress.n_votes}  raters={len(progress.raters)}  "
              f"methods={','.join(s.methods)}  link={s.rater_link}")
    return 0


def _cmd_add_rater(args: argparse.Namespace) -> int:
    store = store_from(args)
    study = get_study(store, args.study_id)
    rater = register_rater(store, study.study_id, args.name)
    print(f"rater {rater.rater_id} '{rater.name}' in study {study.study_id}")
    print(f"personal link: ?{link_query(study.token, rater.secret)}   (append to the dashboard's URL; "
          "give it to this person only: it lets its holder answer as them, and it is not shown again)")
    return 0


def _print_results(results: StudyResults) -> None:
    print(f"study {results.study.study_id} '{results.study.name}': {results.n_votes} votes on {results.n_items_rated} items")
    kappa = "n/a" if results.kappa is None else f"{results.kappa:.3f}"
    print(f"Fleiss' kappa {kappa} over {results.kappa_items} items with >= 2 raters")
    if results.excluded_raters:
        print(f"excluded for failing gold items: {', '.join(results.excluded_raters)}")
    print(f"{'method':24s} {'wins':>7s} {'win rate':>9s} {'95% CI':>15s} {'rating':>7s} {'95% CI':>13s}")
    for s in results.scores:
        rating = "" if s.mean_rating is None else f"{s.mean_rating:.2f}"
        rci = "" if s.rating_low is None else f"{s.rating_low:.2f}-{s.rating_high:.2f}"
        print(f"{s.method:24s} {s.wins:7.1f} {s.win_rate:9.3f} {s.win_low:7.3f}-{s.win_high:.3f} {rating:>7s} {rci:>13s}")


def _cmd_results(args: argparse.Namespace) -> int:
    _print_results(study_results(store_from(args), args.study_id, exclude_failed_gold=not args.keep_failed_gold))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    store = store_from(args)
    if not args.votes and not args.results:
        print(votes_csv(store, args.study_id), end="")
        return 0
    if args.votes:
        with output_file(args.votes) as path:
            path.write_text(votes_csv(store, args.study_id))
        print(f"wrote {path}")
    if args.results:
        results = study_results(store, args.study_id, exclude_failed_gold=not args.keep_failed_gold)
        with output_file(args.results) as path:
            path.write_text(results_csv(results))
        print(f"wrote {path}")
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    delete_study(store_from(args), args.study_id)
    print(f"deleted study {args.study_id}")
    return 0


def _cmd_close(args: argparse.Namespace) -> int:
    study = set_study_open(store_from(args), args.study_id, args.reopen)
    print(f"study {study.study_id} is {'open' if study.is_open else 'closed'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``python -m neuroviz study create|list|results|export|close|delete``."""
    study = subparsers.add_parser("study", help="blind user studies of neuron labels")
    sub = study.add_subparsers(dest="study_command", metavar="ACTION")
    sub.required = True

    p = sub.add_parser("create", help="create a study from labelled runs and print its rater link")
    p.add_argument("name", help="the study's name (shown only to you)")
    p.add_argument("--runs", help="comma-separated run keys (instead of --model/--layers)")
    p.add_argument("--model", help="model spec whose extracted runs to use")
    p.add_argument("--layers", help="comma-separated layers (default: every extracted layer)")
    p.add_argument("--probe", help="probe set id, name or folder (when a layer was extracted over several)")
    p.add_argument("--methods", help="comma-separated methods (default: every method with labels on these runs)")
    p.add_argument("--per-layer", type=positive_int, default=10, help="random neurons per layer")
    p.add_argument("--raters-per-item", type=positive_int, default=3)
    p.add_argument("--gold", type=non_negative_int, default=2, help="gold (attention-check) items to build from probe labels")
    p.add_argument("--images", type=positive_int, default=10, help="top images shown per neuron")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.set_defaults(func=_cmd_create)

    p = sub.add_parser("list", help="list studies with progress and rater links")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("add-rater", help="register a rater and print their personal link (hand it to them)")
    p.add_argument("study_id")
    p.add_argument("name", nargs="?", help="a label for you (names are not identities: two raters may share one)")
    p.set_defaults(func=_cmd_add_rater)

    p = sub.add_parser("results", help="win rates, ratings and agreement of a study")
    p.add_argument("study_id")
    p.add_argument("--keep-failed-gold", action="store_true", help="count raters who failed gold items too")
    p.set_defaults(func=_cmd_results)

    p = sub.add_parser("export", help="write votes and results as CSV (votes to stdout by default)")
    p.add_argument("study_id")
    p.add_argument("--votes", type=output_path, help="file for the de-blinded votes CSV")
    p.add_argument("--results", type=output_path, help="file for the scores CSV")
    p.add_argument("--keep-failed-gold", action="store_true")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("close", help="stop accepting votes (or --reopen)")
    p.add_argument("study_id")
    p.add_argument("--reopen", action="store_true")
    p.set_defaults(func=_cmd_close)

    p = sub.add_parser("delete", help="delete a study and all its votes")
    p.add_argument("study_id")
    p.set_defaults(func=_cmd_delete)
