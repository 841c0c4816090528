"""Write training prompts for self-distillation, disjoint from any benchmark.

Sources: templated code tasks, Python standard-library docstrings turned into
tasks (implement, explain, summarise), templated arithmetic word problems, and
templated chat / knowledge / writing instructions. No benchmark prompt is used.

    python examples/make_prompts.py --out runs/prompts.jsonl --num 2000 --seed 0
"""

import argparse
import importlib
import inspect
import json
import random
from pathlib import Path

CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "returns the n-th Fibonacci number",
    "flattens a nested list", "counts the vowels in a string", "merges two sorted lists",
    "removes duplicates from a list while keeping order", "computes the factorial of n",
    "finds the longest common prefix of a list of strings", "checks whether a string is a palindrome",
    "converts a Roman numeral to an integer", "converts an integer to binary without using bin()",
    "returns the second largest number in a list", "groups words that are anagrams",
    "computes the greatest common divisor of two numbers", "transposes a matrix given as a list of lists",
    "validates an email address with a regular expression", "parses a CSV line into fields",
    "counts word frequencies in a text", "rotates a list by k positions",
    "implements binary search", "implements bubble sort", "implements merge sort",
    "implements quicksort", "checks whether parentheses in a string are balanced",
    "computes the sum of the digits of an integer", "returns all subsets of a list",
    "returns all permutations of a string", "finds the maximum subarray sum",
    "computes the running average of a list", "chunks a list into pieces of size n",
    "capitalizes the first letter of every word", "finds the most common element in a list",
    "checks whether two strings are anagrams", "computes the power set of a set",
    "converts Celsius to Fahrenheit for a list of values", "implements a stack class",
    "implements a queue with two stacks", "implements a simple LRU cache",
    "reads a text file and returns its lines without newlines", "computes the median of a list",
    "finds all prime numbers below n with the sieve of Eratosthenes", "computes the dot product of two vectors",
    "multiplies two matrices", "checks whether a year is a leap year", "returns the number of days between two dates",
    "converts a dictionary to a JSON string and back", "finds the index of the first repeated character",
    "compresses a string with run-length encoding", "decodes a run-length encoded string",
    "implements a binary tree insert and in-order traversal", "computes the depth of a binary tree",
    "detects a cycle in a linked list", "reverses a linked list", "finds the intersection of two lists",
    "counts the number of islands in a grid", "solves the two-sum problem",
    "computes the Levenshtein distance between two strings", "generates Pascal's triangle",
    "converts a snake_case string to camelCase", "pads a number with leading zeros",
    "returns the k largest elements of a list", "computes the cumulative sum of a list",
    "splits a sentence into words and sorts them by length", "checks whether a list is sorted",
    "computes the area of a circle given its radius", "simulates rolling two dice 1000 times",
    "formats a number of seconds as hours, minutes and seconds", "validates a Sudoku row",
]
CODE_FORMS = [
    "Write a Python function that {t}.",
    "Write a Python function that {t}. Include a docstring and an example.",
    "Implement a function in Python that {t}, and explain how it works.",
    "Show me Python code that {t}.",
    "Write a JavaScript function that {t}.",
    "Write a C function that {t}.",
    "Write a Python function that {t}, with type hints and a few test cases.",
]
STDLIB = [
    "string", "textwrap", "re", "math", "statistics", "random", "itertools", "functools",
    "collections", "heapq", "bisect", "os.path", "shutil", "json", "csv", "datetime", "calendar",
    "fractions", "decimal", "operator", "copy", "pathlib", "glob", "fnmatch", "hashlib", "base64",
    "binascii", "zlib", "gzip", "difflib", "secrets", "uuid", "urllib.parse", "html", "shlex",
]
STDLIB_FORMS = [
    "Explain what the Python function `{name}` does and give an example of using it.",
    "Implement your own version of `{name}` in Python. Its documentation says: {doc}",
    "Summarize the following documentation in two sentences:\n\n{doc}",
    "Write a short tutorial on `{name}` from the Python standard library.",
    "When would you use `{name}` in Python? Give a code example.",
]
ITEMS = ["apples", "pencils", "books", "cookies", "marbles", "stickers", "tickets", "shirts", "eggs", "cards"]
NAMES = ["Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jack", "Kofi", "Lena"]
MATH_FORMS = [
    "{a} has {x} {item}. {b} gives {a} {y} more, and then {a} gives away {z}. How many {item} does {a} have now?",
    "A shop sells {item} for ${p} each. {a} buys {x} of them and pays with a ${bill} bill. How much change does {a} get?",
    "{a} reads {x} pages a day. How many days does {a} need to read a book of {total} pages?",
    "A train travels at {x} km per hour for {y} hours and then at {z} km per hour for {w} hours. How far does it travel in total?",
    "{a} saves ${x} every week. After {y} weeks {a} spends ${z}. How much money is left?",
    "There are {x} students in a class. {pct}% of them play football. How many students play football?",
    "A rectangle is {x} cm long and {y} cm wide. What are its area and its perimeter?",
    "{a} and {b} share {total} {item} in the ratio {r1}:{r2}. How many {item} does each get?",
    "What is {x} multiplied by {y}, minus {z}?",
    "Solve for x: {x}x + {y} = {total}.",
    "A recipe needs {x} eggs for {y} people. How many eggs are needed for {z} people?",
    "{a} runs {x} km on Monday, {y} km on Tuesday and {z} km on Wednesday. What is the average distance per day?",
]
TOPICS = [
    "photosynthesis", "the water cycle", "black holes", "inflation", "the French Revolution",
    "machine learning", "vaccines", "plate tectonics", "the stock market", "climate change",
    "the human immune system", "electric cars", "the Roman Empire", "quantum computing",
    "the internet", "renewable energy", "democracy", "the theory of evolution", "gravity",
    "the printing press", "blockchain", "the Renaissance", "nutrition", "sleep", "volcanoes",
    "the Moon landing", "antibiotics", "supply and demand", "recycling", "DNA", "the Industrial Revolution",
    "coral reefs", "the solar system", "meditation", "interest rates", "cloud computing", "bees",
]
PAIRS = [
    ("a virus", "a bacterium"), ("weather", "climate"), ("Python", "Java"), ("a list", "a tuple"),
    ("stocks", "bonds"), ("RAM", "storage"), ("a democracy", "a monarchy"), ("mitosis", "meiosis"),
    ("TCP", "UDP"), ("an alligator", "a crocodile"), ("speed", "velocity"), ("a lake", "a sea"),
]
CHAT_FORMS = [
    "Explain {t} in simple terms.", "What is {t}? Answer in a short paragraph.",
    "Give me three interesting facts about {t}.", "Why is {t} important?",
    "Write a short blog post about {t}.", "Write a poem about {t}.",
    "Describe {t} to a ten-year-old.", "What are common misconceptions about {t}?",
    "Write a short story that involves {t}.", "List the pros and cons of {t}.",
]
PAIR_FORMS = ["What is the difference between {a} and {b}?", "Compare {a} and {b} in a few sentences."]
ADVICE = [
    "staying focused while studying", "learning a new language", "saving money", "cooking rice",
    "writing a cover letter", "preparing for a job interview", "starting to run", "keeping houseplants alive",
    "organizing a small team", "giving a good presentation", "planning a road trip", "sleeping better",
]
ADVICE_FORMS = [
    "Give me five tips for {t}.", "Write an email to a friend with advice on {t}.",
    "What should a beginner know about {t}?",
]


def stdlib_entries():
    entries = []
    for mod_name in STDLIB:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not callable(obj):
                continue
            doc = inspect.getdoc(obj) or ""
            doc = " ".join(doc.split("\n\n")[0].split())
            if 40 <= len(doc) <= 600:
                entries.append((f"{mod_name}.{name}", doc))
    return entries


def math_prompt(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    x, y, z, w = (rng.randint(2, 60) for _ in range(4))
    r1, r2 = rng.randint(1, 5), rng.randint(1, 5)
    fields = dict(
        a=a, b=b, x=x, y=y, z=min(z, x + y), w=w, item=rng.choice(ITEMS), p=rng.randint(1, 9),
        bill=rng.choice([20, 50, 100]), total=rng.randint(5, 40) * (r1 + r2),
        pct=rng.choice([10, 20, 25, 40, 50, 75]), r1=r1, r2=r2,
    )
    return rng.choice(MATH_FORMS).format(**fields)


def make_prompts(num: int, seed: int = 0):
    rng = random.Random(seed)
    stdlib = stdlib_entries()
    kinds = ["code", "stdlib", "math", "chat", "pair", "advice"]
    weights = [0.25, 0.15, 0.25, 0.2, 0.05, 0.1]
    seen = set()
    while len(seen) < num:
        kind = rng.choices(kinds, weights)[0]
        if kind == "code":
            p = rng.choice(CODE_FORMS).format(t=rng.choice(CODE_TASKS))
        elif kind == "stdlib":
            name, doc = rng.choice(stdlib)
            p = rng.choice(STDLIB_FORMS).format(name=name, doc=doc)
        elif kind == "math":
            p = math_prompt(rng)
        elif kind == "chat":
            p = rng.choice(CHAT_FORMS).format(t=rng.choice(TOPICS))
        elif kind == "pair":
            a, b = rng.choice(PAIRS)
            p = rng.choice(PAIR_FORMS).format(a=a, b=b)
        else:
            p = rng.choice(ADVICE_FORMS).format(t=rng.choice(ADVICE))
        if p not in seen:
            seen.add(p)
            yield {"prompt": p, "kind": kind}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "w") as f:
        for row in make_prompts(args.num, args.seed):
            f.write(json.dumps(row) + "\n")
    tmp.replace(out)
    print(f"wrote {args.num} prompts to {out}")


if __name__ == "__main__":
    main()
