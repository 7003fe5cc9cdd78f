"""Match queries against references and write a submission CSV `query_id,reference_id,score`.

    python scripts/rerank.py --queries Q/ --references R/ --output sub.csv --descriptor-only --k 10 \
        [--descriptor-checkpoint desc.pt] [--index runs/ref_index] [--views full|halves|grid] [--overwrite]

Multi-process (CPU or GPU): `accelerate launch scripts/rerank.py ...` splits the work and writes one submission.
"""
from pair_vit import cli, rerank

if __name__ == "__main__":
    cli.main(rerank.RerankConfig, rerank.run)
