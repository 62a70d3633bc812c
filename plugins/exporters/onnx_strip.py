"""What the ONNX exporter records about the machine that built a graph, removed before the file is written."""

from __future__ import annotations


def strip_build_metadata(model) -> None:
    """Remove, in place, what the exporter records about the machine that built the graph.

    The dynamo exporter annotates nodes, values and the graph with ``metadata_props``
    (``pkg.torch.onnx.stack_trace`` holds absolute source paths, ``fx_node`` and
    ``class_hierarchy`` name the Python code) and may fill ``doc_string``s. All of it goes,
    in the main graph, every subgraph and every function, and the model's own entries
    (sslkit's ``metadata_props["sslkit"]`` is added after this).
    """
    def clear(item) -> None:
        fields = item.DESCRIPTOR.fields_by_name
        if "metadata_props" in fields:
            del item.metadata_props[:]
        if "doc_string" in fields:
            item.doc_string = ""

    def graph(g) -> None:
        clear(g)
        for v in (*g.input, *g.output, *g.value_info, *g.initializer):
            clear(v)
        for sparse in g.sparse_initializer:
            clear(sparse.values)
        for node in g.node:
            nodes(node)

    def nodes(node) -> None:
        clear(node)
        for attr in node.attribute:
            clear(attr)
            if attr.HasField("g"):
                graph(attr.g)
            for sub in attr.graphs:
                graph(sub)

    clear(model)
    graph(model.graph)
    for fn in model.functions:
        clear(fn)
        for v in fn.value_info:
            clear(v)
        for node in fn.node:
            nodes(node)
