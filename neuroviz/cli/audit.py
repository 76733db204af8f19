"""``python -m neuroviz audit MODEL QUERY``: search every layer's labels for a concept (text and meaning);
labels of an SAE's latents are listed as such ("features.18 · SAE latents 3f2a1b2c  latent 12")."""

from __future__ import annotations

import argparse

from ..audit import AuditOptions
from ._common import CommandLineError, comma_list, open_model_and_probe_set, output_dir, output_folder, positive_int, store_from, unit_float


def cmd_audit(args: argparse.Namespace) -> int:
    """Print the matching neurons (optionally save or export the audit), or --list the saved audits."""
    from .. import audit as audit_mod

    if args.list:
        for a in audit_mod.list_audits(store_from(args)):
            print(f"{a['id']}  {a['query']!r}  {a['model_spec']}  {a['n_hits']} hits")
        return 0
    if not args.model or not args.query:
        raise CommandLineError("Give a model and a query, e.g. `python -m neuroviz audit offline:mobilenet_v2 face`, or --list.")
    store, model, probe_set = open_model_and_probe_set(args)
    options = AuditOptions(match_text=not args.meaning_only, match_meaning=not args.text_only,
                           min_similarity=args.min_similarity, units=comma_list(args.units))
    audit = audit_mod.search(store, model.spec, probe_set.id, args.query, options)
    if not audit.hits:
        print(f"no label matches {args.query!r} in {len(audit.layers_searched)} layers ({audit.n_labels_searched} labels); "
              "try --min-similarity lower or other words")
    for h in audit.hits:
        print(f"{h.match_score:.3f}  {h.match_kind:14s} {h.place:20s} {h.unit_word} {h.neuron:<5d} {h.method:14s} {h.label}")
    if args.save:
        print("saved as", audit_mod.save_audit(store, audit))
    if args.export:
        for path in audit_mod.export_audit(audit, output_folder(args.export)):
            print("wrote", path)
    args._result = {"audit": audit.id, "n_hits": len(audit.hits)}
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``audit`` command."""
    p = subparsers.add_parser("audit", help="search every layer's labels for a concept (text and meaning)")
    p.add_argument("model", nargs="?")
    p.add_argument("query", nargs="?")
    p.add_argument("--probe", default="demo")
    p.add_argument("--image-size", type=positive_int)
    p.add_argument("--text-only", action="store_true")
    p.add_argument("--meaning-only", action="store_true")
    p.add_argument("--min-similarity", type=unit_float, default=AuditOptions.min_similarity)
    p.add_argument("--units", help="only these units, comma-separated: neurons, sae:<key>, directions:<key> "
                                   "(default: the neurons and every SAE's latents, each hit naming which)")
    p.add_argument("--save", action="store_true", help="store the audit in the cache")
    p.add_argument("--export", metavar="FOLDER", type=output_dir, help="write <id>.csv and <id>.json there")
    p.add_argument("--list", action="store_true", help="list saved audits")
    p.set_defaults(func=cmd_audit)
