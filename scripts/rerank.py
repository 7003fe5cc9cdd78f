"""Match queries against references and write a submission CSV `query_id,reference_id,score`.

    python scripts/rerank.py --queries Q/ --references R/ --output sub.csv [--k 20] [--pair-views full center] \
        [--checkpoint PAIR.pt] [--descriptor-checkpoint DESC.pt] [--index runs/ref_index] [--overwrite]
    python scripts/rerank.py ... --descriptor-only         # the stage-1 shortlist alone

Multi-process (CPU or GPU): `accelerate launch scripts/rerank.py ...` splits the work and writes one submission.
A killed run resumes from OUTPUT.work/ when restarted with the same arguments (plus --overwrite if the output
was already written).
"""
from pair_vit import cli
from pair_vit.match import rerank

if __name__ == "__main__":
    cli.main(rerank.RerankConfig, rerank.run)
