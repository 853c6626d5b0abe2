"""The HTTP gateway (`orchestrator gateway`): HTTP requests in, Kafka requests out, answers from
the response, dead-letter and progress topics.

It never imports the service: it speaks Kafka with the project's codec. Every replica keeps the
state of every job by tailing, without a consumer group, the gateway's compacted job-registry
topic and the progress, response and dead-letter topics from their retained start (bounded by a
lookback), so a GET, an events stream or a cancel works on any replica and survives a restart.
"""
