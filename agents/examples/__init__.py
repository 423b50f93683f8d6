"""Small agents to start from: `bus agent start agents.examples.greeter:Greeter`."""
