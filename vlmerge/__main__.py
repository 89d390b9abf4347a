from vlmerge.cli import search_main

if __name__ == "__main__":
    search_main()
