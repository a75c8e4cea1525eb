"""PathGPT-style route recommendation on the real Helsinki OSM driving graph: retrieved historical trips + an LLM
that picks roads, resolved to edges and connected by Dijkstra, so every answer is a valid path."""
